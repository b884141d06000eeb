"""Official MMAudio codec checkpoints -> our params: the mel VAE (`v1-16.pth`, `v1-44.pth`) and the
BigVGAN vocoders (`best_netG.pt`, `nvidia/bigvgan_v2_44khz_128band_512x`).

Checkpoints store the VAE's raw magnitude-preserving conv weights; MMAudio fuses them once after
loading (`MPConv1D.remove_weight_norm`), in float32, and so do we here. Files are read without
executing pickled code (`torch_io.read_state_dict`), keys and shapes are checked strictly, and the
preset is inferred from the shapes.

Stable API: `load_vae`, `load_vocoder`.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import traverse_util

from visaudio_jax.audio.vae import VAE_PRESETS, VAEConfig, init_vae
from visaudio_jax.convert.bigvgan import load_vocoder  # noqa: F401  (part of this module's API)
from visaudio_jax.convert.state_dict import (check_state_dict, module_path, require_finite, resolve_preset,
                                             torch_key)
from visaudio_jax.convert.torch_io import CheckpointError, read_state_dict

_VAE_ATTRIBUTES = frozenset({'mid/block_1', 'mid/block_2', 'mid/attn_1'})


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
  """float32 a*b + c rounded once, like the FMA instructions in torch's AVX2 kernels.

  a*b is exact in float64; the float64 sum is made round-to-odd (TwoSum error term) so that the
  final cast to float32 cannot double-round."""
  p = a.astype(np.float64) * b.astype(np.float64)
  c = np.asarray(c, np.float64)
  s = p + c
  t = s - p
  err = (p - (s - t)) + (c - t)
  even = (s.view(np.uint64) & 1) == 0
  s = np.where((err != 0) & even, np.nextafter(s, np.copysign(np.inf, err)), s)
  return s.astype(np.float32)


def _float32_channel_norms(w: np.ndarray) -> np.ndarray:
  """Per-output-channel L2 norms, bitwise torch's `vector_norm(dtype=float32)` on x86-64 CPUs.

  torch reduces the contiguous (in, k) row in its AVX2 kernel (AVX512 CPUs dispatch to it too):
  x*x summed into 8 lanes in sequence; the lanes summed 0..7 in sequence; then GCC's vectorised
  tail loop adds the next 4 squares (if 4 are left) in order, and the last 0-3 by scalar FMA."""
  rows = w.reshape(w.shape[0], -1)
  fan_in = rows.shape[1]
  if fan_in == 1:  # torch returns |x| here, with no square to underflow
    return np.abs(rows[:, 0])
  squares = rows * rows
  body = fan_in // 8 * 8
  vectorised = body + (fan_in - body) // 4 * 4
  lanes = np.zeros((rows.shape[0], 8), np.float32)
  if body:  # ufunc.accumulate adds strictly in sequence (np.sum would go pairwise)
    lanes = np.add.accumulate(squares[:, :body].reshape(rows.shape[0], -1, 8), axis=1)[:, -1]
  total = np.add.accumulate(np.concatenate([lanes, squares[:, body:vectorised]], axis=1), axis=1)[:, -1]
  for col in range(vectorised, fan_in):
    total = _fma32(rows[:, col], rows[:, col], total)
  return np.sqrt(total)


def fuse_mp_weight(weight: np.ndarray) -> np.ndarray:
  """MMAudio's `MPConv1D.remove_weight_norm`: w / (1e-4 + |w_o| / sqrt(fan_in)) / sqrt(fan_in),
  in float32 like the original (whose `1e-4 + alpha * norm` is one fused multiply-add)."""
  w = np.asarray(weight, np.float32)
  fan_in = w[0].size
  norm = _float32_channel_norms(w).reshape((-1,) + (1,) * (w.ndim - 1))
  alpha = np.full_like(norm, np.sqrt(1.0 / fan_in))
  norm = _fma32(alpha, norm, np.float32(1e-4))
  return ((w / norm) / np.float32(np.sqrt(fan_in))).astype(weight.dtype)


def vae_state_dict_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
  """The torch state dict (keys and shapes) of `VAE(data_dim, embed_dim, hidden_dim)`."""
  abstract = jax.eval_shape(lambda: init_vae(config))
  shapes = {}
  for path, leaf in traverse_util.flatten_dict(abstract).items():
    key = torch_key(path, _VAE_ATTRIBUTES)
    if path[-1] == 'kernel':  # (k, in, out) <- (out, in, k)
      shapes[key.rsplit('.', 1)[0] + '.weight'] = tuple(reversed(leaf.shape))
    elif path[-1] in ('data_mean', 'data_std'):
      shapes[key] = (1, leaf.shape[0], 1)
    else:
      shapes[key] = tuple(leaf.shape)
  return shapes


def infer_vae_config(state: dict[str, np.ndarray], source: str | os.PathLike = 'state dict') -> VAEConfig:
  try:
    data_dim = state['data_mean'].shape[1]
    embed_dim = state['decoder.conv_in.weight'].shape[1]
    hidden_dim = state['decoder.conv_out.weight'].shape[1]
  except (KeyError, IndexError) as err:
    raise CheckpointError(f'{os.fspath(source)}: not an MMAudio VAE state dict (needs data_mean, '
                          f'decoder.conv_in.weight, decoder.conv_out.weight; problem: {err!r})') from None
  config = VAEConfig(data_dim=data_dim, embed_dim=embed_dim, hidden_dim=hidden_dim)
  if data_dim not in (80, 128):
    raise CheckpointError(f'{os.fspath(source)}: VAE data_dim {data_dim}, expected 80 (16 kHz) or 128 (44.1 kHz)')
  return config


def vae_state_dict_to_params(state: dict[str, np.ndarray], config: VAEConfig | None = None, *,
                             fused: bool = False, source: str | os.PathLike = 'state dict'
                             ) -> tuple[VAEConfig, dict]:
  """A VAE state dict (raw checkpoint weights, or already `fused`) -> (config, params)."""
  config = config or infer_vae_config(state, source)
  check_state_dict(source, f'MMAudio VAE {config}', vae_state_dict_shapes(config), state)
  require_finite(source, state)
  flat = {}
  for key, value in state.items():
    path = module_path(key)
    if path[-1] == 'weight':
      weight = value if fused else fuse_mp_weight(value)
      flat[path[:-1] + ('kernel',)] = np.ascontiguousarray(weight.transpose(2, 1, 0))
    elif path[-1] in ('data_mean', 'data_std'):
      flat[path] = value.reshape(-1)
    else:
      flat[path] = value
  return config, traverse_util.unflatten_dict(flat)


def load_vae(path: str | os.PathLike, config: VAEConfig | str | None = None, *, fused: bool = False,
             key: str | None = None) -> tuple[VAEConfig, dict]:
  """Read an MMAudio VAE checkpoint (`.pth` or `.safetensors`) into (config, params).

  `config`: a VAEConfig, a preset name ('vae_16k', 'vae_44k'), or None to infer it from shapes.
  `fused`: the file holds inference weights already (after `remove_weight_norm`); official
  checkpoints do not.
  """
  config = resolve_preset(config, VAE_PRESETS, 'VAE')
  return vae_state_dict_to_params(read_state_dict(path, key), config, fused=fused, source=path)
