"""One mesh ('data', 'fsdp', 'tensor'), logical axis names everywhere, rules from the config.

Params are created directly in their final sharding (`train/state.py`: `jax.jit` of the init with
out_shardings, from an abstract `jax.eval_shape` pass), so no full copy ever sits on one device.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding

from visaudio_jax.model.config import NetworkConfig
from visaudio_jax.model.network import init_variables


def make_mesh(shape: Sequence[int], axes: Sequence[str] = ('data', 'fsdp', 'tensor'),
              devices=None) -> jax.sharding.Mesh:
  """A mesh over all (or the given) devices; one -1 in `shape` takes the remaining devices.
  Axes are Auto so logical constraints and GSPMD propagation apply (jax.make_mesh defaults to Explicit)."""
  devices = devices if devices is not None else jax.devices()
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f'mesh shape {shape}: at most one -1')
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = len(devices) // rest
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f'mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {len(devices)}')
  return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def logical_specs(cfg: NetworkConfig):
  """PartitionSpecs of logical axis names for every param (abstract; nothing allocated)."""
  return nn.get_partition_spec(jax.eval_shape(lambda: init_variables(cfg)))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, jax.P(('data', 'fsdp')))
