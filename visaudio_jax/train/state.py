"""The training state (params, optimizer, EMA, step, RNG) and its placement on the mesh.

The state is created abstractly first (`jax.eval_shape`), its shardings follow the params' logical
axis names through the config's rules, and `create_state` materialises it with those shardings as
`out_shardings`, so no device ever holds a full copy of anything the rules shard. The same abstract
state (leaves carrying their shardings) is the Orbax restore target.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from visaudio_jax.model.config import NetworkConfig
from visaudio_jax.model.network import init_variables
from visaudio_jax.train import optim

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # () int32: optimizer updates done
  params: PyTree  # the network's 'params' collection, float32
  opt_state: optax.OptState
  ema: PyTree  # {name: params-like}, see optim.ema_init
  rng: jax.Array  # (2,) uint32 raw key data (checkpointable); per-step keys are fold_in(rng, step)


def rules_of(config: ml_collections.ConfigDict) -> list[tuple]:
  return [tuple(r) for r in config.logical_axis_rules]


def _param_specs(cfg: NetworkConfig) -> tuple[PyTree, PyTree]:
  """Abstract (unboxed) params and their logical PartitionSpecs."""
  boxed = jax.eval_shape(lambda: init_variables(cfg))['params']
  return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def _follow_params(tree: PyTree, param_specs: PyTree) -> PyTree:
  """Logical specs for any tree holding param-shaped copies (Adam moments, EMAs): a leaf whose path
  ends with a param's path and has its rank takes that param's spec; anything else (counters,
  scalars) is replicated. Works whatever optax wrappers nest the moments."""
  by_path = {tuple(str(k) for k in path): spec for path, spec in
             jax.tree_util.tree_flatten_with_path(param_specs, is_leaf=lambda x: isinstance(x, jax.P))[0]}
  longest = max(len(p) for p in by_path)

  def spec(path, leaf):
    keys = tuple(str(k) for k in path)
    for n in range(min(longest, len(keys)), 0, -1):
      found = by_path.get(keys[-n:])
      if found is not None:
        return found if len(found) == leaf.ndim else jax.P()
    return jax.P()

  return jax.tree_util.tree_map_with_path(spec, tree)


def abstract_state(net: NetworkConfig, config: ml_collections.ConfigDict, tx: optax.GradientTransformation):
  """(abstract TrainState, logical PartitionSpecs of every leaf)."""
  params, param_specs = _param_specs(net)

  def build(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=optim.ema_init(params, optim.EMAConfig.from_block(config.ema)), rng=jnp.zeros((2,), jnp.uint32))

  state = jax.eval_shape(build, params)
  specs = TrainState(step=jax.P(), params=param_specs, opt_state=_follow_params(state.opt_state, param_specs),
                     ema=_follow_params(state.ema, param_specs), rng=jax.P())
  return state, specs


def state_shardings(specs: PyTree, mesh: jax.sharding.Mesh, rules) -> PyTree:
  return nn.logical_to_mesh_sharding(specs, mesh, [tuple(r) for r in rules])


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs that carry their sharding: the Orbax restore target."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def create_state(net: NetworkConfig, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                 shardings: PyTree, mesh: jax.sharding.Mesh,
                 params_fn: Callable[[], PyTree] | None = None) -> TrainState:
  """A fresh state made in place on the mesh. `params_fn` (traced inside the jit) supplies starting
  params, e.g. imported MMAudio weights; by default the network's own seeded init."""
  seed = int(config.seed)

  def build():
    params = params_fn() if params_fn is not None else nn.meta.unbox(init_variables(net, seed))['params']
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=optim.ema_init(params, optim.EMAConfig.from_block(config.ema)),
                      rng=jax.random.key_data(jax.random.key(int(config.train.seed))))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_of(config)):
    return jax.jit(build, out_shardings=shardings)()


def check_batch_fits_mesh(global_batch: int, mesh: jax.sharding.Mesh, accum_steps: int = 1) -> None:
  """The batch is split over ('data', 'fsdp') devices and into `accum_steps` micro-batches."""
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch % accum_steps or (global_batch // accum_steps) % shards:
    raise ValueError(
        f'train.global_batch_size={global_batch} must split into grad_accum_steps={accum_steps} micro-batches '
        f'each divisible by the data x fsdp devices of mesh {dict(mesh.shape)} ({shards}); e.g. '
        f'{accum_steps * shards * max(1, global_batch // (accum_steps * shards))}')

