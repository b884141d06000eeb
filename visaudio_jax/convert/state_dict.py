"""PyTorch state-dict keys <-> nested Flax param paths for modules that mirror torch's layout.

The audio codec modules (VAE, vocoders) are named after the torch modules they port, so a state
dict key maps to a param path by one rule: a ModuleList index joins the name before it
(`encoder.down.0.block.1.conv1.weight` -> ('encoder', 'down_0', 'block_1', 'conv1', 'weight');
`ups.2.0.weight` -> ('ups_2_0', 'weight')). Conversions then only transpose leaves. The rule is
not invertible by itself (`mid.block_1` is an attribute name); invert it over a known key list.
"""
from __future__ import annotations

import os
from typing import Mapping

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


def torch_key(path: tuple[str, ...], attributes: frozenset[str] = frozenset()) -> str:
  """Inverse of `module_path` over a known layout: `_<digits>` suffixes become indices, except for
  the `parent/name` pairs in `attributes`, which are torch attribute names (e.g. 'mid/block_1')."""
  parts: list[str] = []
  for i, name in enumerate(path):
    if i and f'{path[i - 1]}/{name}' in attributes:
      parts.append(name)
      continue
    head, *indices = name.split('_')
    while indices and not indices[0].isdigit():  # `conv_in`, `nin_shortcut`: words, not indices
      head = f'{head}_{indices.pop(0)}'
    if not all(x.isdigit() for x in indices):
      raise ValueError(f'cannot map param path {path} to a torch key')
    parts += [head, *indices]
  return '.'.join(parts)
