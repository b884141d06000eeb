"""Synchformer checkpoint (`synchformer_state_dict.pth`, as MMAudio loads it) -> our visual params.

Like `Synchformer.load_state_dict`, only keys starting with `vfeat_extractor` are kept (the file
also holds the audio branch and the sync head) and then checked strictly; the prefix is stripped
(our params are `vfeat_extractor`'s, see `encoders.synchformer`). Files are read without executing
pickled code (`torch_io.read_state_dict`); params keep the stored dtype (kernels transposed).
The unused 2D `patch_embed.proj` is required and kept, so the key set round-trips.

Stable API: `load_synchformer`.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np

from visaudio_jax.convert.state_dict import (check_state_dict, params_from_state_dict, require_finite,
                                             resolve_preset, torch_shapes)
from visaudio_jax.convert.torch_io import CheckpointError, read_state_dict
from visaudio_jax.encoders.synchformer import SYNCHFORMER_PRESETS, SynchformerConfig, init_synchformer

PREFIX = 'vfeat_extractor'
_NESTED = ('state_dict', 'model')  # tried, in order, when the top level is not a flat tensor dict


@functools.lru_cache(maxsize=8)
def synchformer_state_dict_shapes(config: SynchformerConfig) -> dict[str, tuple[int, ...]]:
  """The `vfeat_extractor.*` keys and torch shapes of `config`'s Synchformer."""
  abstract = jax.eval_shape(lambda: init_synchformer(config))
  return {f'{PREFIX}.{k}': s for k, s in torch_shapes(abstract).items()}


def select_visual(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The entries `Synchformer.load_state_dict` keeps: keys starting with 'vfeat_extractor'."""
  return {k: v for k, v in state.items() if k.startswith(PREFIX)}


def infer_synchformer_config(state: dict[str, np.ndarray], source: str | os.PathLike = 'state dict'
                             ) -> SynchformerConfig:
  """The config read off `vfeat_extractor.*` shapes. Heads do not show in shapes: a preset's when
  its embed_dim matches, else embed_dim // 64 (ViT's usual head width). The segment stride (8)
  and eps are MMAudio's fixed values."""
  source = os.fspath(source)

  def shape(name: str, ndim: int) -> tuple[int, ...]:
    key = f'{PREFIX}.{name}'
    if key not in state:
      raise CheckpointError(f'{source}: cannot infer the Synchformer config, {key} is missing '
                            f'(not a Synchformer checkpoint?)')
    if state[key].ndim != ndim:
      raise CheckpointError(f'{source}: {key} has shape {tuple(state[key].shape)}, expected {ndim} dims')
    return tuple(state[key].shape)

  d, in_chans, pt, ph, pw = shape('patch_embed_3d.proj.weight', 5)
  npatch = shape('pos_embed', 3)[1] - 1
  temporal = shape('temp_embed', 3)[1]
  hidden = shape('blocks.0.mlp.fc1.weight', 2)[0]
  grid = int(round(np.sqrt(max(npatch, 0))))
  if ph != pw or grid * grid != npatch or npatch < 1:
    raise CheckpointError(f'{source}: cannot infer the Synchformer config: patch {ph}x{pw}, '
                          f'{npatch} position embeddings (expected square patches and a square grid)')
  depth = 0
  while f'{PREFIX}.blocks.{depth}.norm1.weight' in state:
    depth += 1
  heads = next((p.num_heads for p in SYNCHFORMER_PRESETS.values() if p.embed_dim == d), d // 64)
  if heads < 1 or d % heads:
    raise CheckpointError(f'{source}: cannot infer the number of heads for embed_dim {d}; pass a config')
  try:
    return SynchformerConfig(img_size=grid * ph, patch_size=ph, temporal_patch=pt, embed_dim=d, depth=depth,
                             num_heads=heads, mlp_ratio=hidden // d if hidden % d == 0 else hidden / d,
                             frames_per_segment=temporal * pt, in_chans=in_chans)
  except ValueError as err:
    raise CheckpointError(f'{source}: the shapes imply an invalid Synchformer config ({err})') from None


def state_dict_to_synchformer_params(state: dict[str, np.ndarray], config: SynchformerConfig | None = None,
                                     source: str | os.PathLike = 'state dict') -> tuple[SynchformerConfig, dict]:
  """A full Synchformer state dict (other keys ignored) -> (config, params without the prefix)."""
  visual = select_visual(state)
  if not visual:
    some = ', '.join(list(state)[:8])
    raise CheckpointError(f'{os.fspath(source)}: no {PREFIX}.* keys (not a Synchformer checkpoint?); '
                          f'keys start with: {some}')
  config = config or infer_synchformer_config(visual, source)
  check_state_dict(source, f'Synchformer visual branch {config}', synchformer_state_dict_shapes(config), visual)
  require_finite(source, visual)
  return config, params_from_state_dict({k[len(PREFIX) + 1:]: v for k, v in visual.items()})


def load_synchformer(path: str | os.PathLike, config: SynchformerConfig | str | None = None,
                     key: str | None = None) -> tuple[SynchformerConfig, dict]:
  """Read a Synchformer checkpoint (`.pth` or `.safetensors`) into (config, visual params).

  `config`: a SynchformerConfig, a preset name, or None to infer it from shapes. `key` selects a
  nested state dict; with None, a torch file whose top level is not a flat tensor dict is read
  under 'state_dict', then 'model'.
  """
  config = resolve_preset(config, SYNCHFORMER_PRESETS, 'Synchformer')
  state = read_state_dict(path, key, wrappers=_NESTED)
  return state_dict_to_synchformer_params(state, config, source=path)
