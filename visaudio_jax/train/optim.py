"""MMAudio's optimiser, learning-rate schedule and EMAs as pure functions over pytrees.

Reference: `mmaudio/runner.py` and `config/{base,train}_config.yaml` (spec mmaudio.md §5.1-5.2).

* `learning_rate_schedule`: torch `SequentialLR([LambdaLR((s+1)/(W+1)), MultiStepLR(decay_steps, gamma)],
  milestones=[W])`, value for value. The step decays count from the end of the warm-up (torch calls
  `MultiStepLR.step(0)` at the milestone), so MMAudio's [240k, 270k] decay at global steps 241k / 271k.
* `make_optimizer`: clip the global gradient norm (1.0), then AdamW (b1 0.9, b2 0.95, eps 1e-6, wd 1e-6,
  decoupled decay lr * wd * param as in torch), weight decay only where `weight_decay_mask` says so;
  the frozen params (`network.FROZEN_PARAMS`) get zero updates, hold no Adam state and do not count
  towards the clipped norm (torch: `requires_grad=False`, no gradient at all); optional skipping of
  non-finite gradients (`optax.MultiSteps`). The schedule is indexed by the optimiser's own update
  count (0 for the first update, like MMAudio's `it`). Gradient accumulation happens inside the train
  step (`train.grad_accum_steps`), so one step is always one update.
* EMAs (`ema_init` / `ema_update`): nitrous_ema's power-function EMA (EDM2, Karras et al. 2024) for
  each of `sigma_rels`, with MMAudio's `step_size_correction=True`, and plain fixed-decay EMAs for
  each of `decays`. Post-hoc synthesis of another sigma_rel from snapshots (EDM2 Algorithm 3):
  `solve_posthoc_weights` + `synthesize_ema`.

Deviations from MMAudio, on purpose: weight decay skips norms, biases and embedding-like tables by
default (`optim.weight_decay_on='kernels'`; MMAudio decays every trainable param: set 'all'); the
clip scales by max_norm / norm where torch's `clip_grad_norm_` uses max_norm / (norm + 1e-6).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from visaudio_jax.model.network import FROZEN_PARAMS

PyTree = Any


# --------------------------------------------------------------------------------------------------
# Configs.


def default_optim_config() -> ml_collections.ConfigDict:
  """The experiment config's `optim` block, at MMAudio's values (`config/train_config.yaml`)."""
  return ml_collections.ConfigDict(dict(
      lr=1e-4,
      warmup_steps=1000,  # LambdaLR factor (step + 1) / (warmup_steps + 1) for steps < warmup_steps
      decay_steps=[240000, 270000],  # MultiStepLR milestones, counted from the end of the warm-up
      decay_factor=0.1,  # MultiStepLR gamma
      b1=0.9,
      b2=0.95,
      eps=1e-6,  # MMAudio: 1e-6 with amp (its default), 1e-8 without
      weight_decay=1e-6,
      weight_decay_on='kernels',  # 'kernels' (weight_decay_mask) | 'all' (MMAudio: every trainable param)
      clip_norm=1.0,  # global-norm gradient clipping; <= 0 disables it
      skip_nonfinite=False,  # drop micro-batch gradients with a NaN/Inf (optax.skip_not_finite)
  ))


def default_ema_config() -> ml_collections.ConfigDict:
  """The experiment config's `ema` block, at MMAudio's values (`config/{base,train}_config.yaml`)."""
  return ml_collections.ConfigDict(dict(
      sigma_rels=[0.05, 0.1],  # power-function (post-hoc) EMAs, nitrous_ema.PostHocEMA
      decays=[],  # plain EMAs with a fixed decay, e.g. [0.9999]
      step_size_correction=True,  # nitrous_ema's geometric-mean beta (MMAudio passes True)
      update_every=1,
      start=0,  # optimiser updates before the EMAs start (MMAudio's ema.start)
      snapshot_every=5000,  # power-EMA snapshots for post-hoc synthesis, in EMA updates (checkpoint_every)
      output_sigma_rel=0.05,  # what is synthesised after training (default_output_sigma)
  ))


@dataclasses.dataclass(frozen=True)
class EMAConfig:
  """The `ema` block as the jitted step takes it: frozen and hashable (the EMA functions read the same
  attribute names from either)."""
  sigma_rels: tuple[float, ...]
  decays: tuple[float, ...]
  step_size_correction: bool
  update_every: int
  start: int
  snapshot_every: int
  output_sigma_rel: float

  @classmethod
  def from_block(cls, block: ml_collections.ConfigDict) -> 'EMAConfig':
    fields = {f.name: block[f.name] for f in dataclasses.fields(cls)}
    return cls(**{**fields, 'sigma_rels': tuple(block.sigma_rels), 'decays': tuple(block.decays)})


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule.


def learning_rate_schedule(optim_cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """lr for the update with 0-based index `count`, exactly torch's SequentialLR(LambdaLR, MultiStepLR):

    count < W:   lr * (count + 1) / (W + 1)
    count >= W:  lr * gamma ** #{m in decay_steps : m <= count - W}

  with W = warmup_steps. (W = 0 is torch's corner case: SequentialLR never calls `step(0)` then, so the
  MultiStepLR runs one step behind: the offset is max(W, 1) and count 0 gets the full lr.)"""
  base = float(optim_cfg.lr)
  warmup = int(optim_cfg.warmup_steps)
  offset = max(warmup, 1)
  gamma = float(optim_cfg.decay_factor)
  milestones = sorted(int(m) for m in optim_cfg.decay_steps)

  def schedule(count):
    count = jnp.asarray(count, jnp.int32)
    warm = base * (count + 1).astype(jnp.float32) / (warmup + 1)
    num_decays = sum(((count - offset) >= m).astype(jnp.int32) for m in milestones) if milestones else 0
    decayed = base * jnp.power(jnp.float32(gamma), jnp.asarray(num_decays, jnp.float32))
    return jnp.where(count < offset, warm, decayed).astype(jnp.float32)

  return schedule


# --------------------------------------------------------------------------------------------------
# Parameter categories and the weight-decay mask.

# Rules on a param's '/'-joined path (big_vision-style regexes), first match wins. Every param must
# match one: a new kind of param is an error until it is given a category here, never silently decayed.
_FROZEN_RE = '|'.join(re.escape(n) for n in FROZEN_PARAMS)
PARAM_RULES: tuple[tuple[str, str], ...] = (
    # Stored, never trained (MMAudio nn.Parameter(requires_grad=False)): latent statistics, empty text.
    (rf'(^|/)({_FROZEN_RE})$', 'frozen'),
    # Dense / DenseGeneral / Conv weights.
    (r'(^|/)kernel$', 'kernel'),
    # Norm gains and offsets: RMSNorm q_norm / k_norm `scale`, any LayerNorm `scale` / `bias`.
    (r'(^|/)[^/]*norm[^/]*/(scale|bias)$', 'norm'),
    (r'(^|/)scale$', 'norm'),
    # Biases, including free-standing ones such as the joint blocks' `ear_logit_bias`.
    (r'(^|/)([^/]*_)?bias$', 'bias'),
    # Embedding-like tables: learned empty/null conditions (`empty_clip_feat`, ...), positional tables
    # (`sync_pos_emb`, `ear_pos_emb`), embeddings (`ear_embedding`), learned pooling queries (`ear_query`).
    (r'(^|/)(empty_[^/]*|null_[^/]*|[^/]*pos_emb[^/]*|[^/]*embedding[^/]*|[^/]*_query)$', 'embedding'),
)
PARAM_CATEGORIES = ('frozen', 'kernel', 'norm', 'bias', 'embedding')
DECAYED_CATEGORIES = ('kernel',)


def _key_name(key) -> str | None:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return None if key.name == 'value' else key.name  # flax's nn.Partitioned box: skip `.value`
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def param_path(path) -> str:
  """'/'-joined names of a `tree_flatten_with_path` key path, e.g. 'fused_blocks_0/block/qkv/kernel'."""
  return '/'.join(n for n in (_key_name(k) for k in path) if n is not None)


def param_category(name: str) -> str:
  """The PARAM_RULES category of a '/'-joined param path; ValueError if no rule matches."""
  for pattern, category in PARAM_RULES:
    if re.search(pattern, name):
      return category
  raise ValueError(f'param {name!r} matches no rule in optim.PARAM_RULES; give it a category there')


def param_categories(params: PyTree) -> PyTree:
  """Pytree of category strings (one of PARAM_CATEGORIES) shaped like `params` (unboxed or boxed)."""
  unknown = []

  def category(path, _):
    try:
      return param_category(param_path(path))
    except ValueError:
      unknown.append(param_path(path))
      return None

  out = jax.tree_util.tree_map_with_path(category, params)
  if unknown:
    raise ValueError(f'params that match no rule in optim.PARAM_RULES: {unknown}')
  return out


def weight_decay_mask(params: PyTree) -> PyTree:
  """True where AdamW's decoupled weight decay applies: weights (`kernel`) only. Not decayed: norm
  scales, biases, embedding-like tables (learned empty/null features, positional tables, embeddings,
  queries) and the frozen params. Raises on a param no rule covers (see PARAM_RULES)."""
  return jax.tree.map(lambda c: c in DECAYED_CATEGORIES, param_categories(params))


def trainable_labels(params: PyTree) -> PyTree:
  """'frozen' for `network.FROZEN_PARAMS`, 'trainable' for everything else (optax.partition labels)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'frozen' if re.search(PARAM_RULES[0][0], param_path(path)) else 'trainable', params)


# --------------------------------------------------------------------------------------------------
# Optimiser.


def make_optimizer(optim_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule) on the trainable params, zero updates (and no state) for the
  frozen ones; wrapped in optax.MultiSteps to skip non-finite gradients."""
  if optim_cfg.weight_decay_on == 'kernels':
    mask = weight_decay_mask
  elif optim_cfg.weight_decay_on == 'all':
    mask = None
  else:
    raise ValueError(f"optim.weight_decay_on: 'kernels' or 'all', not {optim_cfg.weight_decay_on!r}")
  adamw = optax.adamw(learning_rate_schedule(optim_cfg), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                      weight_decay=optim_cfg.weight_decay, mask=mask)
  # Inside the partition, the clip sees only the trainable gradients, as torch's clip_grad_norm_ does.
  trainable = optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), adamw) if optim_cfg.clip_norm > 0 else adamw
  tx = optax.partition({'trainable': trainable, 'frozen': optax.set_to_zero()}, trainable_labels)
  if optim_cfg.skip_nonfinite:
    tx = optax.MultiSteps(tx, every_k_schedule=1, should_skip_update_fn=optax.skip_not_finite)
  return tx


def optimizer_update_count(opt_state: PyTree) -> jax.Array:
  """Updates applied so far (the schedule's `count` for the next update), read from the state."""
  is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
  counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_sched) if is_sched(s)]
  if len(counts) != 1:
    raise ValueError(f'expected one schedule count in the optimiser state, found {len(counts)}')
  return counts[0]


# --------------------------------------------------------------------------------------------------
# EMAs.


def sigma_rel_to_gamma(sigma_rel: float) -> float:
  """Power-function exponent for a relative std (EDM2 Algorithm 2): the largest real root of
  g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2), i.e. sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3))."""
  t = float(sigma_rel) ** -2
  return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


def _name_of(value: float) -> str:
  return f'{value:g}'.replace('.', 'p').replace('-', 'm')  # no '.' in pytree keys (checkpoint paths)


def ema_profiles(ema_cfg: ml_collections.ConfigDict) -> dict[str, tuple[str, float]]:
  """EMA name -> ('power', gamma) or ('plain', decay), in a fixed order: power EMAs first."""
  profiles = {f'sigma_rel_{_name_of(s)}': ('power', sigma_rel_to_gamma(s)) for s in ema_cfg.sigma_rels}
  profiles |= {f'decay_{_name_of(d)}': ('plain', float(d)) for d in ema_cfg.decays}
  if len(profiles) != len(ema_cfg.sigma_rels) + len(ema_cfg.decays):
    raise ValueError('ema.sigma_rels / ema.decays must not repeat a value')
  return profiles


def ema_init(params: PyTree, ema_cfg: ml_collections.ConfigDict) -> dict[str, PyTree]:
  """EMA name (see `ema_profiles`) -> an fp32 copy of `params` (a real copy, sharding kept: never the
  params' own buffers, so a state holding both can be donated)."""
  def copy(x):
    x = jnp.asarray(x)
    return jnp.copy(x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x)
  return {name: jax.tree.map(copy, params) for name in ema_profiles(ema_cfg)}


def ema_count(step, ema_cfg: ml_collections.ConfigDict):
  """nitrous_ema's `step` as its beta sees it (its counter after the increment): the number of
  `update()` calls so far including this one, i.e. step - start + 1 for the update with 0-based index
  `step` (MMAudio's `it`; it calls `ema.update()` when `it >= ema.start`). Snapshots taken when this is
  a multiple of `snapshot_every` carry it as their time for `solve_posthoc_weights` (nitrous' file names)."""
  return step - int(ema_cfg.start) + 1


def ema_decay(step, kind: str, value: float, ema_cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(beta, 1 - beta) in fp32 for the EMA update after the optimiser update with 0-based index `step`.

  Power EMA, n = ema_count(step): nitrous_ema's KarrasEMA.beta with update_every u,
    step_size_correction:  beta = ((1 - 1/(n+1))^(1+g) * (1 - 1/(n+1+u))^(1+g))^(u/2)
    otherwise:             beta = (1 - 1/(n+1))^(1+g),
  computed in log space so 1 - beta keeps fp32 precision at n ~ 1e5. Plain EMA: beta = decay.
  n <= 1 gives beta = 0 (the first update copies the params, as nitrous_ema's `initted` copy does; before
  `start` the EMA just follows the params). Between updates (u > 1: (n - 1) % u != 0) beta = 1."""
  n = jnp.asarray(ema_count(step, ema_cfg), jnp.int32)
  u = int(ema_cfg.update_every)
  if kind == 'power':
    nf = jnp.maximum(n, 1).astype(jnp.float32)
    e = 1.0 + value
    if ema_cfg.step_size_correction:
      log_beta = 0.5 * u * e * (jnp.log1p(-1.0 / (nf + 1.0)) + jnp.log1p(-1.0 / (nf + 1.0 + u)))
    else:
      log_beta = e * jnp.log1p(-1.0 / (nf + 1.0))
    beta, weight = jnp.exp(log_beta), -jnp.expm1(log_beta)
  elif kind == 'plain':
    beta, weight = jnp.float32(value), jnp.float32(1.0 - value)
  else:
    raise ValueError(f'unknown EMA kind {kind!r}')
  first = n <= 1
  beta, weight = jnp.where(first, 0.0, beta), jnp.where(first, 1.0, weight)
  skip = (jnp.maximum(n, 1) - 1) % u != 0
  beta, weight = jnp.where(skip, 1.0, beta), jnp.where(skip, 0.0, weight)
  return beta.astype(jnp.float32), weight.astype(jnp.float32)


def _lerp(ema, param, beta, weight):
  """torch.lerp(ema, param, weight) in fp32, its two branches included (exact copy at weight 1)."""
  if not jnp.issubdtype(ema.dtype, jnp.floating):
    return param
  p = jnp.asarray(param).astype(jnp.float32)
  return jnp.where(weight < 0.5, ema + weight * (p - ema), p - (p - ema) * beta)


def ema_update(ema: dict[str, PyTree], params: PyTree, step, ema_cfg: ml_collections.ConfigDict,
               active=True) -> dict[str, PyTree]:
  """All EMAs after the optimiser update with 0-based index `step` produced `params`: MMAudio's `it`,
  the train state's step before it is incremented, the same count the lr schedule takes. Jit-able with
  `step` a traced int32; `active` (traced bool) False leaves the EMAs unchanged, e.g. when a
  non-finite gradient was skipped (optax.MultiSteps.has_updated)."""
  out = {}
  for name, (kind, value) in ema_profiles(ema_cfg).items():
    beta, weight = ema_decay(step, kind, value, ema_cfg)
    beta, weight = jnp.where(active, beta, 1.0), jnp.where(active, weight, 0.0)
    out[name] = jax.tree.map(lambda e, p, b=beta, w=weight: _lerp(e, p, b, w), ema[name], params)
  return out


def power_profile_dot(t_a, gamma_a, t_b, gamma_b):
  """EDM2 `p_dot_p`: inner product of two power-function EMA profiles, each the normalised weighting
  (g + 1) tau^g / t^(g + 1) on [0, t] of the EMA with exponent g taken at time t."""
  t_ratio = t_a / t_b
  t_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
  t_max = np.maximum(t_a, t_b)
  num = (gamma_a + 1) * (gamma_b + 1) * t_ratio ** t_exp
  den = (gamma_a + gamma_b + 1) * t_max
  return num / den


def solve_posthoc_weights(snapshot_steps: Sequence[float], snapshot_gammas: Sequence[float],
                          target_sigma_rel: float, target_step: float | None = None) -> np.ndarray:
  """Least-squares weights of the snapshots (EMA at time t_i with exponent g_i) whose combined profile
  best matches the power EMA with `target_sigma_rel` at `target_step` (default: the last snapshot):
  EDM2 Algorithm 3 / nitrous_ema `solve_weights`, the normal equations A x = b in float64 (no
  renormalisation of x, as nitrous_ema). Times are ema_count values (nitrous' file names)."""
  t_i = np.asarray(snapshot_steps, np.float64).reshape(-1)
  g_i = np.asarray(snapshot_gammas, np.float64).reshape(-1)
  if t_i.shape != g_i.shape or t_i.size == 0:
    raise ValueError('need as many snapshot steps as gammas, at least one')
  t_r = float(t_i.max() if target_step is None else target_step)
  if t_r > t_i.max():
    raise ValueError(f'target step {t_r} is after the last snapshot {t_i.max()}')
  g_r = sigma_rel_to_gamma(target_sigma_rel)
  rv, cv = (lambda x: x.reshape(-1, 1)), (lambda x: x.reshape(1, -1))
  a = power_profile_dot(rv(t_i), rv(g_i), cv(t_i), cv(g_i))
  b = power_profile_dot(rv(t_i), rv(g_i), np.array([[t_r]]), np.array([[g_r]]))
  return np.linalg.solve(a, b)[:, 0]


def synthesize_ema(snapshots: Sequence[PyTree], weights: Sequence[float]) -> PyTree:
  """sum_i weights[i] * snapshots[i] in fp32 (numpy or jax leaves)."""
  if len(snapshots) != len(weights) or not snapshots:
    raise ValueError(f'{len(snapshots)} snapshots but {len(weights)} weights')
  out = None
  for snap, w in zip(snapshots, weights):
    w = np.float32(w)
    term = jax.tree.map(lambda x, w=w: x.astype(np.float32) * w, snap)
    out = term if out is None else jax.tree.map(lambda a, b: a + b, out, term)
  return out
