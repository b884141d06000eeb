"""BigVGAN checkpoints (MMAudio's 16 kHz `best_netG.pt`, NVIDIA's BigVGAN-v2) -> vocoder params.

Checkpoints keep weight norm unfused, under either torch naming: the parametrization
(`<layer>.parametrizations.weight.original0` = g, `.original1` = v) or the legacy
`<layer>.weight_g` / `<layer>.weight_v`; already fused dicts (`<layer>.weight`) load too. The fold
is torch's `remove_weight_norm`, w = v * (g / ||v||) with the norm over all dims but 0 and no eps
(a ConvTranspose1d's dim 0 is its input channel), computed in the stored dtype. Then every conv
weight is transposed to (K, in, out): Conv1d from (out, in, K), ConvTranspose1d from (in, out, K).
The anti-alias filter buffers are checked against `ANTIALIAS_FILTER` and dropped.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
from flax import traverse_util

from visaudio_jax.audio.vocoder import ANTIALIAS_FILTER, VocoderConfig, init_vocoder
from visaudio_jax.convert.state_dict import check_state_dict, module_path, require_finite
from visaudio_jax.convert.torch_io import CheckpointError, read_state_dict

# weight-norm key suffix -> which tensor it holds (both torch namings)
WEIGHT_NORM_SUFFIXES = {'.parametrizations.weight.original0': 'g', '.parametrizations.weight.original1': 'v',
                        '.weight_g': 'g', '.weight_v': 'v'}
FILTER_BUFFERS = ('upsample.filter', 'downsample.lowpass.filter')  # under every Activation1d


def _convs(config: VocoderConfig) -> list[tuple[str, bool, bool]]:
  """Every (weight-normed) conv layer: (torch prefix, is ConvTranspose1d, has bias)."""
  layers = [('conv_pre', False, True)]
  layers += [(f'ups.{i}.0', True, True) for i in range(len(config.upsample_rates))]
  num_blocks = len(config.upsample_rates) * len(config.resblock_kernel_sizes)
  for j in range(num_blocks):
    dilations = config.resblock_dilation_sizes[j % len(config.resblock_kernel_sizes)]
    names = ('convs1', 'convs2') if config.resblock == '1' else ('convs',)
    layers += [(f'resblocks.{j}.{name}.{n}', False, True) for name in names for n in range(len(dilations))]
  return layers + [('conv_post', False, config.use_bias_at_final)]


def _activations(config: VocoderConfig) -> list[str]:
  """Torch prefix of every anti-aliased activation (each holds the filter buffers)."""
  per_block = 2 if config.resblock == '1' else 1
  num_blocks = len(config.upsample_rates) * len(config.resblock_kernel_sizes)
  out = []
  for j in range(num_blocks):
    dilations = config.resblock_dilation_sizes[j % len(config.resblock_kernel_sizes)]
    out += [f'resblocks.{j}.activations.{a}' for a in range(per_block * len(dilations))]
  return out + ['activation_post']


def _buffer_keys(config: VocoderConfig) -> list[str]:
  return [f'{prefix}.{name}' for prefix in _activations(config) for name in FILTER_BUFFERS]


def _param_keys(config: VocoderConfig) -> dict[str, str]:
  """Fused torch param key -> kind: 'conv' (out, in, K), 'conv_transpose' (in, out, K) or 'vector'."""
  keys = {}
  for prefix, transposed, bias in _convs(config):
    keys[f'{prefix}.weight'] = 'conv_transpose' if transposed else 'conv'
    if bias:
      keys[f'{prefix}.bias'] = 'vector'
  names = ('alpha', 'beta') if config.activation == 'snakebeta' else ('alpha',)
  for prefix in _activations(config):
    keys.update({f'{prefix}.act.{name}': 'vector' for name in names})
  return keys


def param_path(key: str) -> tuple[str, ...]:
  """Torch key -> our param path: `module_path`, with the leaf `weight` renamed `kernel`."""
  path = module_path(key)
  return path[:-1] + ('kernel',) if path[-1] == 'weight' else path


def _to_flax(kind: str, value: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    return value.transpose(2, 1, 0)  # (out, in, K) -> (K, in, out)
  if kind == 'conv_transpose':
    return value.transpose(2, 0, 1)  # (in, out, K) -> (K, in, out)
  return value


@functools.cache
def _fused_shapes(config: VocoderConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """Fused torch key -> torch shape, read off our module's abstract init (nothing allocated)."""
  abstract = traverse_util.flatten_dict(jax.eval_shape(lambda: init_vocoder(config)))
  out = []
  for key, kind in _param_keys(config).items():
    shape = abstract.pop(param_path(key)).shape
    if kind == 'conv':
      shape = (shape[2], shape[1], shape[0])
    elif kind == 'conv_transpose':
      shape = (shape[1], shape[2], shape[0])
    out.append((key, tuple(shape)))
  if abstract:  # the key enumeration and the module disagree: a bug here, not in a checkpoint
    raise AssertionError(f'vocoder params without a torch key: {sorted(abstract)[:8]}')
  return tuple(out)


def expected_state_dict_shapes(config: VocoderConfig, form: str = 'fused', buffers: bool = False
                               ) -> dict[str, tuple[int, ...]]:
  """The torch state dict of `config`: key -> shape.

  form 'fused' has `<layer>.weight`; 'weightnorm' has torch's parametrization keys instead,
  g (dim0, 1, 1) and v. `buffers` adds the (1, 1, 12) anti-alias filter buffers.
  """
  if form not in ('fused', 'weightnorm'):
    raise ValueError(f"form must be 'fused' or 'weightnorm', got {form!r}")
  out = {}
  for key, shape in _fused_shapes(config):
    if form == 'weightnorm' and key.endswith('.weight'):
      layer = key[:-len('.weight')]
      out[f'{layer}.parametrizations.weight.original0'] = (shape[0],) + (1,) * (len(shape) - 1)
      out[f'{layer}.parametrizations.weight.original1'] = shape
    else:
      out[key] = shape
  if buffers:
    out.update({key: (1, 1, ANTIALIAS_FILTER.size) for key in _buffer_keys(config)})
  return out


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
  """torch's weight norm (dim 0) fused: w = v * (g / ||v||), norm over all dims but 0, no eps.

  Computed in the stored dtype (half types in float32, as torch accumulates them) and returned in v's.
  """
  dtype = np.promote_types(v.dtype, np.float32)
  vc = v.astype(dtype)
  norm = np.sqrt(np.sum(vc * vc, axis=tuple(range(1, v.ndim)), keepdims=True))
  return (vc * (g.astype(dtype) / norm)).astype(v.dtype)


def _fold_all(state: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """Replace every weight-normed (g, v) pair, in either naming, by its fused `<layer>.weight`."""
  out, pairs = {}, {}
  for key, value in state.items():
    suffix = next((s for s in WEIGHT_NORM_SUFFIXES if key.endswith(s)), None)
    if suffix is None:
      out[key] = value
    else:
      pairs.setdefault(key[:-len(suffix)], {})[WEIGHT_NORM_SUFFIXES[suffix]] = key
  for layer, parts in pairs.items():
    if len(parts) != 2:
      (part, key), = parts.items()
      raise CheckpointError(f"{source}: weight-norm {key} has no {'v' if part == 'g' else 'g'} counterpart")
    g, v = state[parts['g']], state[parts['v']]
    if v.ndim != 3 or g.shape != (v.shape[0], 1, 1):
      raise CheckpointError(f"{source}: weight-norm {parts['g']} has shape {tuple(g.shape)}, "
                            f"{parts['v']} {tuple(v.shape)}; expected g (dim0, 1, 1) for a 3-d v")
    if f'{layer}.weight' in out:
      raise CheckpointError(f"{source}: {layer}.weight is given both fused and weight-normed ({parts['v']})")
    out[f'{layer}.weight'] = fold_weight_norm(g, v)
  return out


def infer_vocoder_config(state: dict[str, np.ndarray], source: str = 'state dict') -> VocoderConfig:
  """The vocoder config that fused-key `state` (torch layout) was built from, read off its shapes.

  Shapes give num_mels and the width (conv_pre), the upsampling kernels (ups.*), the AMP block kind
  (convs1 vs convs) and kernel sizes, Snake vs SnakeBeta (`beta` keys) and the final bias; v1 always
  has that bias and a tanh, so without it this is BigVGAN-v2's 44k setting: no tanh, clamp. Shapes
  cannot tell the rest, which take BigVGAN's standard values: upsample stride K / 2, dilations
  (1, 3, 5) per AMPBlock1 (the class default (1, 3) per AMPBlock2), logscale Snake parameters.
  Pass an explicit config for anything else.
  """
  def shape(key: str) -> tuple[int, ...]:
    if key not in state:
      raise CheckpointError(f'{source}: cannot infer the vocoder config, {key} is missing (not a '
                            f'BigVGAN generator state dict?)')
    if state[key].ndim != 3:
      raise CheckpointError(f'{source}: {key} has shape {tuple(state[key].shape)}, expected a 3-d conv weight')
    return tuple(state[key].shape)

  channels, num_mels, _ = shape('conv_pre.weight')
  up_kernels = [shape('ups.0.0.weight')[2]]
  while f'ups.{len(up_kernels)}.0.weight' in state:
    up_kernels.append(shape(f'ups.{len(up_kernels)}.0.weight')[2])
  resblock = '1' if 'resblocks.0.convs1.0.weight' in state else '2'
  conv = 'convs1' if resblock == '1' else 'convs'
  block_ids = {int(k.split('.')[1]) for k in state if k.split('.')[0] == 'resblocks' and k.split('.')[1].isdigit()}
  num_blocks = max(block_ids) + 1 if block_ids else 0
  if num_blocks == 0 or num_blocks % len(up_kernels):
    raise CheckpointError(f'{source}: cannot infer the vocoder config, {num_blocks} resblocks for '
                          f'{len(up_kernels)} upsampling stages')
  num_kernels = num_blocks // len(up_kernels)
  has_bias = 'conv_post.bias' in state
  try:
    return VocoderConfig(
        num_mels=num_mels, upsample_rates=tuple(k // 2 for k in up_kernels),
        upsample_kernel_sizes=tuple(up_kernels), upsample_initial_channel=channels, resblock=resblock,
        resblock_kernel_sizes=tuple(shape(f'resblocks.{j}.{conv}.0.weight')[2] for j in range(num_kernels)),
        resblock_dilation_sizes=((1, 3, 5) if resblock == '1' else (1, 3),) * num_kernels,
        activation='snakebeta' if any(k.endswith('.act.beta') for k in state) else 'snake',
        snake_logscale=True, use_tanh_at_final=has_bias, use_bias_at_final=has_bias)
  except ValueError as err:
    raise CheckpointError(f'{source}: the shapes imply an invalid vocoder config ({err})') from None


def _describe(config: VocoderConfig) -> str:
  return (f'BigVGAN vocoder (num_mels={config.num_mels}, upsample_rates={config.upsample_rates}, '
          f'upsample_kernel_sizes={config.upsample_kernel_sizes}, upsample_initial_channel='
          f'{config.upsample_initial_channel}, resblock={config.resblock!r}, resblock_kernel_sizes='
          f'{config.resblock_kernel_sizes}, activation={config.activation!r}, use_bias_at_final='
          f'{config.use_bias_at_final})')


def state_dict_to_vocoder_params(state: dict[str, np.ndarray], config: VocoderConfig | None = None,
                                 source: str = 'state dict') -> tuple[VocoderConfig, dict]:
  """Strict import of a BigVGAN generator state dict (any weight-norm form); config None: inferred.

  Returns the config and nested params in the stored dtype (conv kernels as transposed views).
  """
  source = os.fspath(source)
  require_finite(source, state)
  state = _fold_all(state, source)
  if config is None:
    config = infer_vocoder_config(state, source)
  for key in [k for k in _buffer_keys(config) if k in state]:
    value = state.pop(key)
    if (value.shape != (1, 1, ANTIALIAS_FILTER.size) or not np.issubdtype(value.dtype, np.floating)
        or not np.array_equal(value.reshape(-1), ANTIALIAS_FILTER.astype(value.dtype))):
      raise CheckpointError(f"{source}: {key} is not BigVGAN's 12-tap Kaiser-sinc anti-alias filter "
                            f"(shape {tuple(value.shape)}, dtype {value.dtype}); this port supports only that filter")
  kinds = _param_keys(config)
  check_state_dict(source, _describe(config), dict(_fused_shapes(config)), state)
  require_finite(source, state)  # a fold over an all-zero v divides by zero
  params = {param_path(key): _to_flax(kinds[key], value) for key, value in state.items()}
  return config, traverse_util.unflatten_dict(params)


def load_vocoder(path: str | os.PathLike, config: VocoderConfig | None = None, key: str | None = None
                 ) -> tuple[VocoderConfig, dict]:
  """Read a BigVGAN checkpoint (.pth without running pickled code, or .safetensors) into params.

  `key` selects a nested state dict. With key None, a torch file whose top level is not a flat
  tensor dict is read under 'generator', where MMAudio's `best_netG.pt` keeps the generator.
  """
  state = read_state_dict(path, key, wrappers=('generator',))
  return state_dict_to_vocoder_params(state, config, source=os.fspath(path))
