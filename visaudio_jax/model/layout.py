"""Convert params between the unrolled layout (`joint_blocks_{i}`, `fused_blocks_{i}`) and the
scanned layout (`joint_blocks`, `fused_blocks` with a leading 'layers' axis), MaxText-style, so a
checkpoint trained either way loads either way."""
from __future__ import annotations

import jax
import numpy as np

from visaudio_jax.model.config import NetworkConfig


def _groups(cfg: NetworkConfig) -> dict[str, int]:
  return {'joint_blocks': cfg.num_joint_blocks - 1, 'fused_blocks': cfg.fused_depth}


def stack_layers(params: dict, cfg: NetworkConfig) -> dict:
  p = dict(params['params'])
  for name, n in _groups(cfg).items():
    if n:
      layers = [p.pop(f'{name}_{i}') for i in range(n)]
      p[name] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
  return {**params, 'params': p}


def unstack_layers(params: dict, cfg: NetworkConfig) -> dict:
  p = dict(params['params'])
  for name, n in _groups(cfg).items():
    if n:
      stacked = p.pop(name)
      for i in range(n):
        p[f'{name}_{i}'] = jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
  return {**params, 'params': p}
