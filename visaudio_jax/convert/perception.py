"""Perception Encoder vision-tower checkpoints (PE-Spatial-{G14,L14,B16,S16,T16}) -> our params.

Like the official `VisionTransformer.load_ckpt`, a top-level 'state_dict' or 'weights' entry is
unwrapped, a 'module.' prefix stripped and, when any key starts with 'visual.' (a whole PE-Core
CLIP checkpoint), only the 'visual.*' keys are kept, unprefixed. Unlike it (strict=False), keys and
shapes are then checked strictly, and values must be finite. Files are read without executing
pickled code (`torch_io.read_state_dict`).

Config inference from shapes: width, patch (`conv1.weight`), CLS token (`class_embedding`
present), pretrain grid (posemb rows - cls = grid^2), layers (number of `resblocks`), mlp width
(`c_fc`) and LayerScale (`ls_1.gamma`). Heads are not in any shape: a config equal to a PE_PRESETS
entry in all of these takes that preset's heads (G14: 16 heads of 96), otherwise heads =
width // 64 (head_dim 64, the rule of every other PE model). Pass `config` for anything else.

Stable API: `load_perception`, `state_dict_to_perception_params`, `infer_perception_config`,
`perception_state_dict_shapes`, `unwrap_perception_state_dict`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from visaudio_jax.convert.state_dict import (check_state_dict, params_from_state_dict, require_finite,
                                             resolve_preset, torch_shapes)
from visaudio_jax.convert.torch_io import CheckpointError, read_state_dict
from visaudio_jax.encoders.perception import PE_PRESETS, PEConfig, init_perception

# PE-Core vision towers pool with these (attention pooling + projection); Spatial towers do not.
CORE_HEAD_PREFIXES = ('ln_post.', 'attn_pool.')
CORE_HEAD_KEYS = ('proj',)


def perception_state_dict_shapes(config: PEConfig) -> dict[str, tuple[int, ...]]:
  """The torch state dict (key -> shape) of `VisionTransformer` with this config."""
  return torch_shapes(jax.eval_shape(lambda: init_perception(config)))


def unwrap_perception_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strip 'module.' and, when present, keep only the 'visual.' keys, unprefixed (`load_ckpt`)."""
  state = {k.removeprefix('module.'): v for k, v in state.items()}
  if any(k.startswith('visual.') for k in state):
    state = {k[len('visual.'):]: v for k, v in state.items() if k.startswith('visual.')}
  return state


def infer_perception_config(state: Mapping[str, np.ndarray], source: str | os.PathLike = 'state dict') -> PEConfig:
  """A PEConfig from the shapes of an (unwrapped) vision-tower state dict; heads as described above."""
  try:
    width, _, patch, _ = state['conv1.weight'].shape
    cls = 'class_embedding' in state
    rows = state['positional_embedding'].shape[0] - int(cls)
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r'transformer\.resblocks\.(\d+)\.', k)))
    mlp_width = state['transformer.resblocks.0.mlp.c_fc.weight'].shape[0]
  except (KeyError, ValueError) as err:
    raise CheckpointError(f'{os.fspath(source)}: not a Perception Encoder vision tower (needs conv1.weight, '
                          f'positional_embedding, transformer.resblocks.N.*; problem: {err!r})') from None
  grid = math.isqrt(max(rows, 0))
  if grid * grid != rows:
    raise CheckpointError(f'{os.fspath(source)}: positional_embedding has {rows} patch rows, not a square grid')
  config = PEConfig(image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=1,
                    mlp_width=mlp_width, use_cls_token=cls,
                    layer_scale='transformer.resblocks.0.ls_1.gamma' in state)
  for preset in PE_PRESETS.values():
    if dataclasses.replace(preset, heads=1) == config:
      return preset
  if width % 64:
    raise CheckpointError(f'{os.fspath(source)}: width {width} matches no PE preset and is not a multiple of '
                          'head_dim 64: pass config= with the number of heads')
  return dataclasses.replace(config, heads=width // 64)


def state_dict_to_perception_params(state: Mapping[str, np.ndarray], config: PEConfig | str | None = None, *,
                                    dtype: Any = np.float32, source: str | os.PathLike = 'state dict'
                                    ) -> tuple[PEConfig, dict]:
  """A vision-tower state dict (prefixed as `load_ckpt` accepts) -> (config, params in `dtype`;
  None keeps the stored dtype, e.g. float64 for the golden fixtures)."""
  config = resolve_preset(config, PE_PRESETS, 'Perception Encoder')
  state = unwrap_perception_state_dict(state)
  head = sorted(k for k in state if k in CORE_HEAD_KEYS or k.startswith(CORE_HEAD_PREFIXES))
  if head:
    raise CheckpointError(f'{os.fspath(source)}: a PE-Core (pooled CLIP) vision tower: its keys '
                          f'{", ".join(head[:8])}{", ..." if len(head) > 8 else ""} (ln_post, attn_pool, proj) '
                          'are not supported; only PE-Spatial towers (patch tokens) are')
  config = config or infer_perception_config(state, source)
  check_state_dict(source, f'Perception Encoder {config}', perception_state_dict_shapes(config), state)
  require_finite(source, state)
  if dtype is not None:
    state = {k: v.astype(dtype) for k, v in state.items()}
  return config, params_from_state_dict(state)


def load_perception(path: str | os.PathLike, config: PEConfig | str | None = None, key: str | None = None,
                    *, dtype: Any = np.float32) -> tuple[PEConfig, dict]:
  """Read a PE vision-tower checkpoint (`.pth`/`.pt` without running pickled code, or
  `.safetensors`) into (config, params); params are float32 unless `dtype` says otherwise (None:
  as stored).

  `config`: a PEConfig, a PE_PRESETS name, or None to infer it from shapes. `key` selects a nested
  state dict; with None, a torch file whose top level is not a flat tensor dict is read under
  'state_dict', then 'weights' (the official loader's wrappers).
  """
  state = read_state_dict(path, key, wrappers=('state_dict', 'weights'))
  return state_dict_to_perception_params(state, config, dtype=dtype, source=os.fspath(path))
