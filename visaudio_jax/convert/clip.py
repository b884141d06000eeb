"""open_clip CLIP checkpoints (DFN5B ViT-H/14 `open_clip_pytorch_model.bin` / `.safetensors`) -> params.

The file holds `open_clip.CLIP.state_dict()`: both towers, `text_projection` and `logit_scale`
(loaded strictly, as open_clip does; MMAudio uses neither). Keys map onto our params by
`state_dict.flax_leaf`; `.pth` files are read without executing pickled code. A checkpoint wrapped
under 'state_dict' and DDP's 'module.' prefix are accepted.

Config inference: every shape but the attention head counts can be read off the tensors. A state
dict whose shapes equal a preset's (`CLIP_PRESETS`) gets that preset, heads and activation
included (DFN5B's 27 x 27 grid -> `DFN5B_H14_384`). Otherwise, with a warning, open_clip's
conventions: vision heads = width // head_width, head_width 80 / 88 / 104 for the ViT-H / g / bigG
widths 1280 / 1408 / 1664 and 64 otherwise; text heads = width // 64 (open_clip's default of 8 if
64 does not divide it); QuickGELU (OpenAI and DFN weights); image_size = grid * patch. Pass a
`CLIPConfig` when any of this is wrong.

Stable API: `load_clip`.
"""
from __future__ import annotations

import functools
import os
import re
import warnings

import jax
import numpy as np

from visaudio_jax.convert.state_dict import (check_state_dict, params_from_state_dict, require_finite,
                                             resolve_preset, torch_shapes)
from visaudio_jax.convert.torch_io import CheckpointError, read_state_dict
from visaudio_jax.encoders.clip import CLIP_PRESETS, CLIPConfig, init_clip

EMBEDDINGS = ('token_embedding',)
# open_clip's model configs: vision head_width by width, for the towers whose head_width is not 64.
VISION_HEAD_WIDTHS = {1280: 80, 1408: 88, 1664: 104}
TEXT_HEAD_WIDTH = 64


@functools.cache
def clip_state_dict_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
  """`open_clip.CLIP(config).state_dict()` key -> shape, read off our abstract init (no allocation)."""
  return torch_shapes(jax.eval_shape(lambda: init_clip(config)), embeddings=EMBEDDINGS)


def _shape_of(state, source: str):
  def shape(key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
      raise CheckpointError(f'{source}: cannot infer the CLIP config, {key} is missing (not an '
                            f'open_clip CLIP state dict?)')
    s = tuple(state[key].shape)
    if len(s) != ndim:
      raise CheckpointError(f'{source}: {key} has shape {s}, expected {ndim} dims')
    return s
  return shape


def _count_blocks(state, prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r'(\d+)\.')
  ids = {int(m.group(1)) for k in state for m in [pattern.match(k)] if m}
  return max(ids) + 1 if ids else 0


def _signature(c: CLIPConfig) -> tuple:
  """What the state-dict shapes determine (not heads, activation, or image_size beyond the grid)."""
  return (c.embed_dim, c.grid_size, c.patch_size, c.vision_width, c.vision_layers, c.vision_mlp_width,
          c.context_length, c.vocab_size, c.text_width, c.text_layers, c.text_mlp_width)


def infer_clip_config(state, source: str = 'state dict') -> CLIPConfig:
  """The CLIPConfig of an open_clip state dict (any mapping of key -> object with `.shape`): the
  preset with these shapes, else open_clip's head conventions (module docstring)."""
  source = os.fspath(source)
  shape = _shape_of(state, source)
  width, channels, patch, patch_w = shape('visual.conv1.weight', 4)
  tokens, _ = shape('visual.positional_embedding', 2)
  _, embed_dim = shape('visual.proj', 2)
  mlp_width, _ = shape('visual.transformer.resblocks.0.mlp.c_fc.weight', 2)
  vocab_size, text_width = shape('token_embedding.weight', 2)
  context_length, _ = shape('positional_embedding', 2)
  text_mlp, _ = shape('transformer.resblocks.0.mlp.c_fc.weight', 2)
  grid = round(np.sqrt(tokens - 1))
  if channels != 3 or patch != patch_w or grid * grid + 1 != tokens:
    raise CheckpointError(f'{source}: visual.conv1.weight {(width, channels, patch, patch_w)} and '
                          f'visual.positional_embedding ({tokens}, ...) are not a square RGB ViT')
  vision_layers = _count_blocks(state, 'visual.transformer.resblocks.')
  text_layers = _count_blocks(state, 'transformer.resblocks.')
  signature = (embed_dim, grid, patch, width, vision_layers, mlp_width, context_length, vocab_size,
               text_width, text_layers, text_mlp)
  for preset in CLIP_PRESETS.values():
    if _signature(preset) == signature:
      return preset
  vision_heads = width // VISION_HEAD_WIDTHS.get(width, 64)
  text_heads = text_width // TEXT_HEAD_WIDTH if text_width % TEXT_HEAD_WIDTH == 0 else 8  # else open_clip's default
  if not vision_heads or width % vision_heads or text_width % text_heads:
    raise CheckpointError(f'{source}: cannot guess the head counts of vision width {width} / text width '
                          f'{text_width}; pass a CLIPConfig')
  warnings.warn(f'{source}: no CLIP preset has these shapes; assuming open_clip conventions: '
                f'{vision_heads} vision heads, {text_heads} text heads, QuickGELU (pass a CLIPConfig '
                f'if that is wrong)', stacklevel=2)

  def ratio(hidden: int, w: int) -> float:
    r = hidden / w
    return r if int(w * r) == hidden else float(np.nextafter(r, np.inf))  # survive int() truncation

  try:
    return CLIPConfig(
        embed_dim=embed_dim, image_size=grid * patch, patch_size=patch, vision_width=width,
        vision_layers=vision_layers, vision_heads=vision_heads,
        vision_mlp_ratio=ratio(mlp_width, width), context_length=context_length, vocab_size=vocab_size,
        text_width=text_width, text_heads=text_heads, text_layers=text_layers,
        text_mlp_ratio=ratio(text_mlp, text_width))
  except ValueError as err:
    raise CheckpointError(f'{source}: the shapes imply an invalid CLIP config ({err})') from None


def clip_state_dict_to_params(state: dict[str, np.ndarray], config: CLIPConfig | None = None,
                              source: str | os.PathLike = 'state dict') -> tuple[CLIPConfig, dict]:
  """Strict import of an open_clip CLIP state dict: (config, params in the stored dtype)."""
  source = os.fspath(source)
  if state and all(k.startswith('module.') for k in state):
    state = {k[len('module.'):]: v for k, v in state.items()}
  config = config or infer_clip_config(state, source)
  check_state_dict(source, f'open_clip CLIP {config}', clip_state_dict_shapes(config), state)
  require_finite(source, state)
  return config, params_from_state_dict(state, EMBEDDINGS)


def load_clip(path: str | os.PathLike, config: CLIPConfig | str | None = None, key: str | None = None
              ) -> tuple[CLIPConfig, dict]:
  """Read an open_clip CLIP checkpoint (.pth / .bin without running pickled code, or .safetensors).

  `config`: a CLIPConfig, a preset name (`CLIP_PRESETS`), or None to infer it from the shapes.
  `key` selects a nested state dict; with None, a torch file whose top level is not a flat tensor
  dict is read under 'state_dict'.
  """
  config = resolve_preset(config, CLIP_PRESETS, 'CLIP')
  state = read_state_dict(path, key, wrappers=('state_dict',))
  return clip_state_dict_to_params(state, config, source=path)
