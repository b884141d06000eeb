"""Position and time tables built for the sequence lengths in use (MMAudio's non-persistent buffers).

All tables are NumPy constants computed once per configuration, outside `jit`. MMAudio builds them in
float32 with PyTorch's CPU `pow`/`cos`/`sin`, which are not correctly rounded; our float32 tables
agree to one ulp. For the real 8 s presets we ship the tables PyTorch produced
(`data/mmaudio_reference_tables.safetensors`, from `shared/fixtures/mmaudio_net/real_size_buffers`)
and use them bit-for-bit, so the official weights see exactly the numbers they were trained with.
"""
from __future__ import annotations

import functools
import pathlib
from typing import NamedTuple

import numpy as np
import safetensors.numpy

from visaudio_jax.model.config import NetworkConfig

ROPE_THETA = 10000.0
_REFERENCE_FILE = pathlib.Path(__file__).parent / 'data' / 'mmaudio_reference_tables.safetensors'


def _powf(base: float, exponent: np.ndarray) -> np.ndarray:
  """float32 base ** exponent, correctly rounded: computed in float64, then rounded. NumPy's own
  float32 power dispatches by CPU (its AVX-512 loop is 1 ulp off libm on some inputs, which moves
  late RoPE angles by 2e-6), so the tables would depend on the machine that builds them."""
  return (np.float64(np.float32(base)) ** exponent.astype(np.float64)).astype(np.float32)


@functools.cache
def _reference_tables() -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(_REFERENCE_FILE))


def rope_rotations(length: int, head_dim: int, freq_scaling: float = 1.0) -> np.ndarray:
  """(length, head_dim/2, 2, 2) float32 rotation matrices [[cos, -sin], [sin, cos]] (FLUX layout).

  freq_k = scaling * 10000^(-2k/head_dim); angle(p, k) = p * freq_k. The clip stream uses
  scaling = latent_len / clip_len so clip frame p sits at latent time p * N / L_clip.
  """
  ref = _reference_rope(length, head_dim, freq_scaling)
  if ref is not None:
    return ref
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  freqs = np.float32(1.0) / _powf(ROPE_THETA, exponent)
  freqs = (freqs * np.float32(freq_scaling)).astype(np.float32)
  angle = (np.arange(length, dtype=np.float32)[:, None] * freqs[None]).astype(np.float32)
  cos = np.cos(angle.astype(np.float64)).astype(np.float32)
  sin = np.sin(angle.astype(np.float64)).astype(np.float32)
  return np.stack([cos, -sin, sin, cos], axis=-1).reshape(length, head_dim // 2, 2, 2)


def _reference_rope(length: int, head_dim: int, freq_scaling: float) -> np.ndarray | None:
  if head_dim != 64:
    return None
  tables = _reference_tables()
  if freq_scaling == 1.0:
    key = f'latent_rot_N{length}'
  else:
    n = round(freq_scaling * length)
    key = f'clip_rot_L{length}_for_N{n}' if np.float64(n) / length == freq_scaling else ''
  return tables[key][0] if key in tables else None


def timestep_frequencies(freq_dim: int, max_period: float) -> np.ndarray:
  """(freq_dim/2,) float32: (10000 / max_period) * 10000^(-2k/freq_dim) (MMAudio's TimestepEmbedder)."""
  tables = _reference_tables()
  if freq_dim == 256 and max_period == 10000:
    return tables['t_embed_freqs_v1']
  if freq_dim == 896 and max_period == 1:
    return tables['t_embed_freqs_v2_hidden896']
  exponent = np.arange(0, freq_dim, 2, dtype=np.float32) / np.float32(freq_dim)
  freqs = np.float32(1.0) / _powf(10000.0, exponent)
  return (np.float32(10000.0 / max_period) * freqs).astype(np.float32)


def nearest_exact_index(src_len: int, dst_len: int) -> np.ndarray:
  """Source index of each output of PyTorch `interpolate(mode='nearest-exact')`, float32 rule.

  src = min(floor(float32(float64(i + 0.5) * float32(src/dst))), src - 1): the rule PyTorch uses for
  float32/bf16 tensors on CPU and for every dtype on CUDA. (A float64 ratio differs for 192 -> 345 at
  outputs 57 and 172.)
  """
  scale = np.float32(src_len / dst_len)
  pos = (np.arange(dst_len, dtype=np.float64) + 0.5) * np.float64(scale)
  return np.minimum(np.floor(pos.astype(np.float32)), src_len - 1).astype(np.int32)


class Tables(NamedTuple):
  """Constants the network needs for one set of sequence lengths."""
  latent_rot: np.ndarray  # (N, Dh/2, 2, 2)
  clip_rot: np.ndarray  # (L_clip, Dh/2, 2, 2)
  t_freqs: np.ndarray  # (F/2,)
  sync_index: np.ndarray  # (N,) int32, sync feature -> latent step
  pe_index: np.ndarray  # (N,) int32, PE frame -> latent step


def timestep_embedding_size(cfg: NetworkConfig) -> tuple[int, float]:
  """(frequency embedding size F, max_period): v1 (256, 10000); v2 (D, 1)."""
  return (cfg.hidden_dim, 1.0) if cfg.v2 else (256, 10000.0)


@functools.cache
def make_tables(cfg: NetworkConfig) -> Tables:
  """Cached per config: every traced method asks for them."""
  lens = cfg.seq_lens()
  freq_dim, max_period = timestep_embedding_size(cfg)
  return Tables(
      latent_rot=rope_rotations(lens.latent, cfg.head_dim, 1.0),
      clip_rot=rope_rotations(lens.clip, cfg.head_dim, lens.latent / lens.clip),
      t_freqs=timestep_frequencies(freq_dim, max_period),
      sync_index=nearest_exact_index(lens.sync, lens.latent),
      pe_index=nearest_exact_index(lens.pe, lens.latent))
