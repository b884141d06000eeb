"""One optimizer update: flow-matching loss over both ears, gradients (accumulated over micro-batches
when asked), the optax chain, the EMAs; and the jitted, sharded, state-donating wrapper around it.

Randomness is `fold_in(state.rng, step)` inside the jit: a resumed run draws exactly the keys the
uninterrupted one would have, whatever the device count.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from visaudio_jax.model import flow_matching as fm
from visaudio_jax.model.network import FROZEN_PARAMS, FlowNetwork
from visaudio_jax.train import optim
from visaudio_jax.train.state import TrainState, rules_of

Batch = dict[str, jax.Array]
# The shard fields a train or validation step reads (ids, captions, audio stay on the host).
BATCH_FIELDS = ('clip_f', 'sync_f', 'text_f', 'pe_f', 'latent_mean', 'latent_std')
# Per-t-bucket losses: the loss is very different near noise (t = 0) and near data (t = 1).
T_BUCKETS = 4


def zero_frozen(grads):
  """MMAudio's frozen parameters (latent statistics, empty-string features) get no gradient, so
  they also do not count towards the clipped gradient norm."""
  def zero(path, g):
    return jnp.zeros_like(g) if any(getattr(k, 'key', None) in FROZEN_PARAMS for k in path) else g
  return jax.tree_util.tree_map_with_path(zero, grads)


def _loss_and_grads(model: FlowNetwork, flow: fm.FlowMatchingConfig, params, batch: Batch, key):
  def loss_fn(p):
    return fm.training_loss(model, {'params': p}, batch, key, flow)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  bucket = jnp.minimum((aux['t'] * T_BUCKETS).astype(jnp.int32), T_BUCKETS - 1)  # (B,)
  stats = {
      'loss': loss,
      't_bucket_loss_sum': jax.ops.segment_sum(aux['loss_per_sample'], bucket, T_BUCKETS),
      't_bucket_count': jax.ops.segment_sum(jnp.ones_like(aux['t']), bucket, T_BUCKETS),
      'drop_video_rate': aux['drop_video'].mean(),
      'drop_text_rate': aux['drop_text'].mean(),
  }
  return grads, stats


def train_step(state: TrainState, batch: Batch, *, model: FlowNetwork, flow: fm.FlowMatchingConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule, ema_config: optim.EMAConfig,
               accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """Pure: (state, global batch) -> (next state, metrics). With `accum_steps` > 1 the batch is cut
  into that many micro-batches whose mean gradient makes one update (memory / accum_steps)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  if accum_steps == 1:
    grads, stats = _loss_and_grads(model, flow, state.params, batch, key)
  else:
    micro = jax.tree.map(lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch)
    micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x, nn.logical_to_mesh_axes((None, 'activation_batch') + (None,) * (x.ndim - 2))), micro)

    def body(carry, xs):
      i, mb = xs
      grads, stats = _loss_and_grads(model, flow, state.params, mb, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, carry, (grads, stats)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: _loss_and_grads(model, flow, state.params, jax.tree.map(lambda x: x[0], micro), key)))
    (grads, stats), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    stats = {k: v if k.startswith('t_bucket') else v / accum_steps for k, v in stats.items()}
  grads = zero_frozen(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optim.ema_update(state.ema, params, state.step, ema_config)
  metrics = dict(stats, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                 update_norm=optax.tree.norm(updates), learning_rate=schedule(state.step))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


def validation_loss(params, batch: Batch, key: jax.Array, *, model: FlowNetwork,
                    flow: fm.FlowMatchingConfig) -> dict[str, jax.Array]:
  """The training objective on a fixed batch with a fixed key (comparable across evaluations),
  without condition dropout."""
  flow = dataclasses.replace(flow, null_video_prob=0.0, null_text_prob=0.0)
  loss, aux = fm.training_loss(model, {'params': params}, batch, key, flow)
  bucket = jnp.minimum((aux['t'] * T_BUCKETS).astype(jnp.int32), T_BUCKETS - 1)
  return {'loss': loss, 't_bucket_loss_sum': jax.ops.segment_sum(aux['loss_per_sample'], bucket, T_BUCKETS),
          't_bucket_count': jax.ops.segment_sum(jnp.ones_like(aux['t']), bucket, T_BUCKETS)}


def _with_rules(fn, mesh, rules):
  @functools.wraps(fn)
  def wrapped(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return fn(*args)
  return wrapped


def jit_train_step(config: ml_collections.ConfigDict, model: FlowNetwork, tx, schedule, shardings: Any,
                   batch_sharding, mesh) -> Any:
  """The jitted step: state donated, state shardings in and out, batch over ('data', 'fsdp')."""
  step = functools.partial(train_step, model=model, flow=fm.flow_config(config.flow), tx=tx, schedule=schedule,
                           ema_config=optim.EMAConfig.from_block(config.ema),
                           accum_steps=int(config.train.grad_accum_steps))
  jitted = jax.jit(step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                   donate_argnums=(0,))
  return _with_rules(jitted, mesh, rules_of(config)), jitted


def jit_validation_loss(config: ml_collections.ConfigDict, model: FlowNetwork, param_shardings, batch_sharding, mesh):
  fn = functools.partial(validation_loss, model=model, flow=fm.flow_config(config.flow))
  return _with_rules(jax.jit(fn, in_shardings=(param_shardings, batch_sharding, None)), mesh, rules_of(config))
