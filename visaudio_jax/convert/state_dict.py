"""PyTorch state-dict keys <-> nested Flax param paths for modules that mirror torch's layout.

The audio codec modules (VAE, vocoders) are named after the torch modules they port, so a state
dict key maps to a param path by one rule: a ModuleList index joins the name before it
(`encoder.down.0.block.1.conv1.weight` -> ('encoder', 'down_0', 'block_1', 'conv1', 'weight');
`ups.2.0.weight` -> ('ups_2_0', 'weight')). Conversions then only transpose leaves. The rule is
not invertible by itself (`mid.block_1` is an attribute name); invert it over a known key list.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from visaudio_jax.convert.torch_io import CheckpointError


def module_path(key: str) -> tuple[str, ...]:
  """`a.b.0.1.c` -> ('a', 'b_0_1', 'c'): numeric ModuleList indices join the preceding name."""
  path: list[str] = []
  for part in key.split('.'):
    if part.isdigit():
      if not path:
        raise ValueError(f'state dict key {key!r} starts with an index')
      path[-1] = f'{path[-1]}_{part}'
    else:
      path.append(part)
  return tuple(path)


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  """Flat torch-keyed tensors -> nested dict by `module_path`."""
  return traverse_util.unflatten_dict({module_path(k): v for k, v in flat.items()})


def check_state_dict(source: str | os.PathLike, what: str, expected: Mapping[str, tuple[int, ...]],
                     state: Mapping[str, np.ndarray]) -> None:
  """Strict key and shape check, with an error that names what is missing, extra or misshapen."""
  missing = [k for k in expected if k not in state]
  extra = [k for k in state if k not in expected]
  wrong = [f'{k}: {tuple(state[k].shape)}, expected {tuple(s)}' for k, s in expected.items()
           if k in state and tuple(state[k].shape) != tuple(s)]
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing keys ({", ".join(missing[:8])}{", ..." if len(missing) > 8 else ""})')
  if extra:
    problems.append(f'{len(extra)} unexpected keys ({", ".join(extra[:8])}{", ..." if len(extra) > 8 else ""})')
  if wrong:
    problems.append(f'{len(wrong)} wrong shapes ({"; ".join(wrong[:8])}{"; ..." if len(wrong) > 8 else ""})')
  if problems:
    raise CheckpointError(f'{os.fspath(source)}: not a {what} state dict: ' + '; '.join(problems))


def require_finite(source: str | os.PathLike, state: Mapping[str, np.ndarray]) -> None:
  bad = [k for k, v in state.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
  if bad:
    raise CheckpointError(f'{os.fspath(source)}: non-finite values in {", ".join(bad[:8])}')


# torch attribute names that end in `_<digit>` (not ModuleList indices) in the modules we port.
TORCH_ATTRIBUTES = frozenset({'ln_1', 'ln_2', 'ls_1', 'ls_2'})


def torch_key(path: tuple[str, ...], attributes: frozenset[str] = frozenset()) -> str:
  """Inverse of `module_path` over a known layout: `_<digits>` suffixes become indices, except for
  names in TORCH_ATTRIBUTES or `attributes`, given as `name` or `parent/name` (e.g. 'mid/block_1')."""
  parts: list[str] = []
  for i, name in enumerate(path):
    if name in TORCH_ATTRIBUTES or name in attributes or (i and f'{path[i - 1]}/{name}' in attributes):
      parts.append(name)
      continue
    head, *indices = name.split('_')
    while indices and not indices[0].isdigit():  # `conv_in`, `nin_shortcut`: words, not indices
      head = f'{head}_{indices.pop(0)}'
    if not all(x.isdigit() for x in indices):
      raise ValueError(f'cannot map param path {path} to a torch key')
    parts += [head, *indices]
  return '.'.join(parts)


def flax_leaf(key: str, value: np.ndarray, embeddings: tuple[str, ...] = ()) -> tuple[tuple[str, ...], np.ndarray]:
  """One torch state-dict entry -> (our param path, array), for modules that mirror torch's:

  Linear `weight` (out, in) -> `kernel` (in, out); conv `weight` (out, in, *k) -> `kernel`
  (*k, in, out); LayerNorm `weight` (C,) -> `scale`; nn.MultiheadAttention's packed
  `in_proj_weight` / `in_proj_bias` -> `in_proj/kernel` (in, 3W) / `in_proj/bias`; the `weight` of
  a module named in `embeddings` (nn.Embedding) -> `embedding`, untransposed. Anything else keeps
  its name and layout.
  """
  path = module_path(key)
  *parent, leaf = path
  if leaf == 'in_proj_weight':
    return (*parent, 'in_proj', 'kernel'), value.T
  if leaf == 'in_proj_bias':
    return (*parent, 'in_proj', 'bias'), value
  if leaf != 'weight':
    return path, value
  if parent and parent[-1] in embeddings:
    return (*parent, 'embedding'), value
  if value.ndim == 1:
    return (*parent, 'scale'), value
  if value.ndim == 2:
    return (*parent, 'kernel'), value.T
  return (*parent, 'kernel'), np.moveaxis(value, (0, 1), (-1, -2))  # (out, in, *k) -> (*k, in, out)


def torch_shapes(params: dict, attributes: frozenset[str] = frozenset(), embeddings: tuple[str, ...] = ()
                 ) -> dict[str, tuple[int, ...]]:
  """The torch state dict (key -> shape) that `flax_leaf` maps onto `params` (arrays or shape structs)."""
  shapes = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    *parent, name = path
    shape = tuple(leaf.shape)
    if parent and parent[-1] == 'in_proj':
      key = torch_key(tuple(parent[:-1]) + (f'in_proj_{"weight" if name == "kernel" else "bias"}',), attributes)
      shapes[key] = shape[::-1] if name == 'kernel' else shape
      continue
    if name == 'embedding' and parent and parent[-1] in embeddings:
      name = 'weight'
    elif name == 'scale':
      name = 'weight'
    elif name == 'kernel':
      name = 'weight'
      shape = shape[::-1] if len(shape) == 2 else (shape[-1], shape[-2], *shape[:-2])
    shapes[torch_key(tuple(parent) + (name,), attributes)] = shape
  return shapes


def params_from_state_dict(state: dict[str, np.ndarray], embeddings: tuple[str, ...] = ()) -> dict:
  """A whole (checked) state dict -> nested params by `flax_leaf`."""
  return traverse_util.unflatten_dict(dict(flax_leaf(k, v, embeddings) for k, v in state.items()))


def resolve_preset(config: Any, presets: Mapping[str, Any], what: str) -> Any:
  """A loader's `config` argument: a config, None (infer from shapes), or a preset name."""
  if not isinstance(config, str):
    return config
  if config not in presets:
    raise ValueError(f'unknown {what} preset {config!r}; expected one of {sorted(presets)}')
  return presets[config]
