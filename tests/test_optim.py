"""visaudio_jax.train.optim: MMAudio's lr schedule, weight-decay mask, clipped AdamW with frozen params and
skipping non-finite gradients, and the plain / power-function (post-hoc) EMAs, each against an independent
reference (torch's scheduler state machine, numpy AdamW, nitrous_ema's update loop, EDM2's moments)."""
from bisect import bisect_right

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from visaudio_jax.model import network
from visaudio_jax.model.config import network_config
from visaudio_jax.train import optim


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule.


def torch_sequential_lr(base, warmup, milestones, gamma, n):
  """lr at scheduler steps 0..n-1 of torch SequentialLR([LambdaLR((s+1)/(W+1)), MultiStepLR(milestones,
  gamma)], milestones=[W]), mirroring torch's code path: construction (LambdaLR's initial step; the
  MultiStepLR's initial step undone to last_epoch -1), then SequentialLR.step(): `step(0)` (closed form)
  on the scheduler that starts at a milestone, the chainable `step()` otherwise."""
  lam = lambda s: (s + 1) / (warmup + 1)  # noqa: E731
  lambda_epoch, multi_epoch = 0, -1
  lr = base * lam(0)
  lrs = [lr]
  for k in range(1, n):
    idx = bisect_right([warmup], k)
    if idx == 0:
      lambda_epoch += 1
      lr = base * lam(lambda_epoch)
    elif k == warmup:
      multi_epoch = 0
      lr = base * gamma ** bisect_right(sorted(milestones), multi_epoch)
    else:
      multi_epoch += 1
      lr = lr * gamma ** list(milestones).count(multi_epoch)
    lrs.append(lr)
  return np.array(lrs)


def _optim_cfg(**overrides):
  cfg = optim.default_optim_config()
  cfg.update(overrides)
  return cfg


@pytest.mark.parametrize('warmup,milestones', [(5, [3, 7]), (1, [0, 2, 2]), (0, [3, 7]), (0, [0, 4]), (3, [])])
def test_schedule_matches_torch_sequential_lr(warmup, milestones):
  cfg = _optim_cfg(lr=2e-3, warmup_steps=warmup, decay_steps=milestones, decay_factor=0.3)
  got = np.asarray(jax.jit(jax.vmap(optim.learning_rate_schedule(cfg)))(jnp.arange(20)))
  np.testing.assert_allclose(got, torch_sequential_lr(2e-3, warmup, milestones, 0.3, 20), rtol=1e-6)


def test_schedule_mmaudio_values_decay_after_the_warmup():
  sched = optim.learning_rate_schedule(optim.default_optim_config())
  expect = {0: 1e-4 / 1001, 1: 2e-4 / 1001, 999: 1e-4 * 1000 / 1001, 1000: 1e-4, 240999: 1e-4, 241000: 1e-5,
            270999: 1e-5, 271000: 1e-6, 299999: 1e-6}
  got = jax.jit(jax.vmap(sched))(jnp.array(list(expect)))
  np.testing.assert_allclose(np.asarray(got), list(expect.values()), rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Weight-decay mask.


def _tiny_params_shapes(arg=None):
  cfg = network_config(tiny.get_config(arg).model)
  return nn.meta.unbox(jax.eval_shape(lambda: network.init_variables(cfg)))['params']


def _flat(tree):
  return {optim.param_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_weight_decay_mask_on_the_tiny_config():
  shapes = _tiny_params_shapes()
  cats = _flat(optim.param_categories(shapes))
  mask = _flat(optim.weight_decay_mask(shapes))
  assert set(cats) == set(mask) == set(_flat(shapes))
  expected = {
      'latent_mean': 'frozen', 'latent_std': 'frozen', 'empty_string_feat': 'frozen',
      'empty_clip_feat': 'embedding', 'empty_sync_feat': 'embedding', 'empty_pe_feat': 'embedding',
      'sync_pos_emb': 'embedding', 'spacetime/ear_pos_emb': 'embedding', 'spacetime/ear_query': 'embedding',
      'fused_blocks_0/block/q_norm/scale': 'norm', 'joint_blocks_0/text_block/k_norm/scale': 'norm',
      'joint_blocks_0/ear_logit_bias': 'bias', 'last_joint_block/latent_block/qkv/bias': 'bias',
      't_embed_1/bias': 'bias', 'final_layer/ada_ln/bias': 'bias',
      't_embed_1/kernel': 'kernel', 'fused_blocks_1/block/qkv/kernel': 'kernel',
      'joint_blocks_0/latent_block/ffn/w2/kernel': 'kernel', 'audio_input_proj_conv/kernel': 'kernel',
      'spacetime/key/kernel': 'kernel', 'global_cond_mlp/w1/kernel': 'kernel',
  }
  assert {k: cats[k] for k in expected} == expected
  # The whole rule on this tree: every leaf in a known category, decay exactly on the weights.
  assert set(cats.values()) <= set(optim.PARAM_CATEGORIES)
  assert {k for k, m in mask.items() if m} == {k for k in cats if k.endswith('/kernel')}
  assert {k for k, c in cats.items() if c == 'frozen'} == set(network.FROZEN_PARAMS)
  assert all(c == 'bias' for k, c in cats.items() if k.endswith('bias'))
  assert all(c == 'norm' for k, c in cats.items() if k.endswith('/scale'))


@pytest.mark.parametrize('arg', ['mono', 'shared,sequential', 'scan'])
def test_weight_decay_mask_covers_the_config_variants(arg):
  cats = _flat(optim.param_categories(_tiny_params_shapes(arg)))
  assert {k for k, c in cats.items() if c == 'kernel'} == {k for k in cats if k.endswith('/kernel')}
  if arg.startswith('shared'):
    assert cats['ear_embedding'] == 'embedding'


def test_weight_decay_mask_rejects_unknown_params_and_reads_boxed_trees():
  with pytest.raises(ValueError, match='w_mystery'):
    optim.weight_decay_mask({'block': {'kernel': np.zeros(2), 'w_mystery': np.zeros(2)}})
  boxed = nn.Partitioned(np.zeros((2, 2)), names=('a', 'b'))
  assert jax.tree.leaves(optim.weight_decay_mask({'dense': {'kernel': boxed, 'bias': np.zeros(2)}})) == [False, True]


# --------------------------------------------------------------------------------------------------
# Optimiser: clipping, AdamW against numpy, frozen params, non-finite skipping.


def _toy_params():
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
  return {'dense': {'kernel': normal(3, 4), 'bias': normal(4)}, 'q_norm': {'scale': 1 + 0.1 * normal(4)},
          'empty_clip_feat': normal(4), 'latent_mean': normal(2)}


def _toy_grads(scale, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (scale * rng.standard_normal(p.shape)).astype(np.float32), _toy_params())


def _trainable_norm(grads):
  return np.sqrt(sum(np.sum(np.square(v)) for k, v in _flat(grads).items() if k != 'latent_mean'))


def _adam_mu(state):
  """The first Adam moment (masked tree: frozen leaves are optax.MaskedNode)."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
  return next(s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s)).mu


@pytest.mark.parametrize('scale', [10.0, 0.01])
def test_clipping_to_global_norm_one_over_the_trainable_grads_only(scale):
  cfg = _optim_cfg(b1=0.0)  # mu after one step = the clipped gradient
  tx, params, grads = optim.make_optimizer(cfg), _toy_params(), _toy_grads(scale, 1)
  grads['latent_mean'] = np.full(2, 1e6, np.float32)  # frozen: must not count in the norm
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  mu = {k: np.asarray(v) for k, v in _flat(_adam_mu(state)).items()}
  assert 'latent_mean' not in mu
  norm = _trainable_norm(grads)
  if norm > 1.0:
    np.testing.assert_allclose(_trainable_norm(mu), 1.0, rtol=1e-6)
    factor = 1.0 / norm
  else:
    factor = 1.0
  for k, v in mu.items():
    np.testing.assert_allclose(v, _flat(grads)[k] * factor, rtol=1e-6)


def numpy_torch_adamw(params, grads_seq, lrs, b1, b2, eps, wd, decayed, clip):
  """torch.optim.AdamW (+ clip over the trainable grads, optax's max_norm / norm factor) in float64;
  `latent_mean` is frozen (requires_grad=False)."""
  p = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
  train = [k for k in p if k != 'latent_mean']
  m = {k: np.zeros_like(p[k]) for k in train}
  v = {k: np.zeros_like(p[k]) for k in train}
  for step, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
    g = {k: np.asarray(x, np.float64) for k, x in _flat(grads).items()}
    norm = np.sqrt(sum(np.sum(g[k] ** 2) for k in train))
    if norm > clip:
      g = {k: x * clip / norm for k, x in g.items()}
    for k in train:
      if decayed(k):
        p[k] = p[k] * (1 - lr * wd)
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      denom = np.sqrt(v[k]) / np.sqrt(1 - b2 ** step) + eps
      p[k] = p[k] - lr / (1 - b1 ** step) * m[k] / denom
  return p


@pytest.mark.parametrize('decay_on', ['kernels', 'all'])
def test_adamw_steps_match_numpy_torch_adamw(decay_on):
  cfg = _optim_cfg(lr=1e-2, warmup_steps=2, decay_steps=[1], decay_factor=0.5, weight_decay=0.5,
                   weight_decay_on=decay_on)
  tx, params = optim.make_optimizer(cfg), _toy_params()
  grads_seq = [_toy_grads(s, seed) for seed, s in enumerate([3.0, 0.05, 0.3, 2.0])]
  state, p = tx.init(params), params
  update = jax.jit(tx.update)
  for g in grads_seq:
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
  assert int(optim.optimizer_update_count(state)) == 4
  lrs = np.asarray(jax.vmap(optim.learning_rate_schedule(cfg))(jnp.arange(4)))
  np.testing.assert_allclose(lrs, [1e-2 / 3, 2e-2 / 3, 1e-2, 5e-3], rtol=1e-6)
  decayed = (lambda k: k.endswith('kernel')) if decay_on == 'kernels' else (lambda k: True)
  ref = numpy_torch_adamw(params, grads_seq, lrs, 0.9, 0.95, 1e-6, 0.5, decayed, 1.0)
  got = _flat(p)
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=1e-7, err_msg=k)
  np.testing.assert_array_equal(got['latent_mean'], params['latent_mean'])


def test_frozen_params_get_no_update_and_no_adam_state():
  shapes = _tiny_params_shapes()
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  tx = optim.make_optimizer(_optim_cfg(warmup_steps=0))
  state, p = tx.init(params), params
  step = jax.jit(lambda g, s, p: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  for seed in range(2):
    grads = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    p, state = step(grads, state, p)
  before, after = _flat(params), _flat(p)
  for k in before:
    if k in network.FROZEN_PARAMS:
      np.testing.assert_array_equal(after[k], before[k])
    else:
      assert not np.array_equal(after[k], before[k]), k
  assert set(_flat(_adam_mu(state))) == set(before) - set(network.FROZEN_PARAMS)


def test_skip_nonfinite_drops_the_gradient():
  tx, params = optim.make_optimizer(_optim_cfg(skip_nonfinite=True)), _toy_params()
  grads = _toy_grads(1.0, 0)
  grads['dense']['bias'][0] = np.nan
  u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  assert int(optim.optimizer_update_count(state)) == 0


# --------------------------------------------------------------------------------------------------
# EMAs.


def _ema_cfg(**overrides):
  cfg = optim.default_ema_config()
  cfg.update(overrides)
  return cfg


def _scan_emas(xs, cfg, active=None, init=None):
  """EMAs over params xs[i] produced by the optimiser update with index i (jit + scan: traced steps),
  from ema_init(init) (default xs[0])."""
  active = jnp.ones(len(xs), bool) if active is None else jnp.asarray(active)
  init = xs[0] if init is None else init

  def run(xs, active, init):
    def body(e, inp):
      s, x, a = inp
      e = optim.ema_update(e, x, s, cfg, active=a)
      return e, e
    return jax.lax.scan(body, optim.ema_init(init, cfg), (jnp.arange(len(xs)), xs, active))[1]

  return jax.jit(run)(xs, active, init)


def test_sigma_rel_to_gamma_matches_mmaudio_and_the_profile_std():
  assert abs(optim.sigma_rel_to_gamma(0.05) - 16.972) < 1e-3
  assert abs(optim.sigma_rel_to_gamma(0.1) - 6.937) < 1e-3
  for s in (0.03, 0.05, 0.1, 0.2):
    g = optim.sigma_rel_to_gamma(s)
    np.testing.assert_allclose((g + 1) / ((g + 2) ** 2 * (g + 3)), s ** 2, rtol=1e-10)


def test_ema_init_names_and_fp32():
  cfg = _ema_cfg(decays=[0.9999])
  ema = optim.ema_init({'w': jnp.ones(3, jnp.bfloat16)}, cfg)
  assert list(ema) == ['sigma_rel_0p05', 'sigma_rel_0p1', 'decay_0p9999']
  assert all(e['w'].dtype == jnp.float32 for e in ema.values())
  params = {'w': jnp.ones(3)}
  ema = optim.ema_init(params, cfg)
  assert all(e['w'] is not params['w'] and e['w'].unsafe_buffer_pointer() != params['w'].unsafe_buffer_pointer()
             for e in ema.values())  # own buffers: a state with params and EMAs can be donated


def test_power_ema_of_a_constant_is_that_constant():
  cfg = _ema_cfg(decays=[0.99])
  c = np.random.default_rng(0).standard_normal(5).astype(np.float32)
  # Initialised from other values: the first update copies the params (nitrous_ema's `initted` copy).
  hist = _scan_emas(jnp.asarray(np.broadcast_to(c, (50, 5))), cfg, init=jnp.full(5, 7.0))
  for name in hist:
    np.testing.assert_array_equal(hist[name], np.broadcast_to(c, (50, 5)))


class NitrousKarrasEMA:
  """nitrous_ema.KarrasEMA's update loop in float64 (`update()`: copy on the first call, beta from the
  post-increment step, torch.lerp)."""

  def __init__(self, gamma, update_every, step_size_correction):
    self.gamma, self.u, self.corr = gamma, update_every, step_size_correction
    self.step, self.ema = 0, None

  @property
  def beta(self):
    s, g, u = self.step, self.gamma, self.u
    if self.corr:
      return ((1 - 1 / (s + 1)) ** (1 + g) * (1 - 1 / (s + 1 + u)) ** (1 + g)) ** (u / 2)
    return (1 - 1 / (s + 1)) ** (1 + g)

  def update(self, params):
    step = self.step
    self.step += 1
    if step % self.u:
      return
    if self.ema is None:
      self.ema = np.array(params, np.float64)
    self.ema = self.ema + (1 - self.beta) * (params - self.ema)


@pytest.mark.parametrize('update_every,correction,start', [(1, True, 0), (3, True, 0), (1, False, 0), (2, True, 5)])
def test_power_ema_matches_nitrous_ema(update_every, correction, start):
  cfg = _ema_cfg(update_every=update_every, step_size_correction=correction, start=start)
  xs = np.cumsum(np.random.default_rng(1).standard_normal((300, 6)), axis=0).astype(np.float32)
  hist = _scan_emas(jnp.asarray(xs), cfg)  # xs[i]: params after the update with index i (MMAudio's it)
  for name, (_, gamma) in optim.ema_profiles(cfg).items():
    ref = NitrousKarrasEMA(gamma, update_every, correction)
    for i, x in enumerate(xs):
      if i >= start:  # MMAudio: `if it >= ema_start: ema.update()`
        ref.update(x.astype(np.float64))
        np.testing.assert_allclose(hist[name][i], ref.ema, rtol=2e-5, atol=2e-5, err_msg=f'{name} it={i}')


def test_power_ema_weighting_has_the_power_profile_moments():
  """After T steps the EMA is sum_t w_t x_t; its weights (impulse inputs) and the EMA of a linear ramp
  have the moments of the profile tau^gamma on [0, T]: mean (g+1)/(g+2) T, std sigma_rel T."""
  t_len = 2000
  t = np.arange(1, t_len + 1)
  xs = np.concatenate([np.eye(t_len), (t / t_len)[:, None]], axis=1).astype(np.float32)
  final = jax.tree.map(lambda h: np.asarray(h[-1], np.float64), _scan_emas(jnp.asarray(xs), _ema_cfg()))
  for sigma in (0.05, 0.1):
    g = optim.sigma_rel_to_gamma(sigma)
    weights = final[f'sigma_rel_{sigma:g}'.replace('.', 'p')]
    w, ramp = weights[:t_len], weights[-1]
    mean = np.sum(w * t) / t_len
    np.testing.assert_allclose(np.sum(w), 1.0, atol=1e-5)
    np.testing.assert_allclose(mean, (g + 1) / (g + 2), atol=5e-4)
    np.testing.assert_allclose(ramp, (g + 1) / (g + 2), atol=5e-4)
    np.testing.assert_allclose(np.sqrt(np.sum(w * (t / t_len - mean) ** 2)), sigma, rtol=3e-3)


def test_plain_ema_matches_a_numpy_loop_and_skips_inactive_steps():
  cfg = _ema_cfg(sigma_rels=[], decays=[0.9, 0.99])
  xs = np.random.default_rng(2).standard_normal((120, 4)).astype(np.float32)
  active = np.random.default_rng(3).random(120) > 0.3
  active[0] = True
  hist = _scan_emas(jnp.asarray(xs), cfg, active=active)
  for decay in (0.9, 0.99):
    ema = None
    for i, (x, a) in enumerate(zip(xs.astype(np.float64), active)):
      if a:
        ema = x if ema is None else decay * ema + (1 - decay) * x
      np.testing.assert_allclose(hist[f'decay_{decay:g}'.replace('.', 'p')][i], ema, rtol=1e-5, atol=1e-6)


def _toy_trajectory(t_len=4000, dims=8):
  rng = np.random.default_rng(0)
  t = np.arange(1, t_len + 1) / t_len
  freqs, phases, amps = rng.uniform(1, 6, (3, dims)), rng.uniform(0, 2 * np.pi, (3, dims)), rng.normal(size=(3, dims))
  xs = (amps * np.sin(2 * np.pi * freqs * t[:, None, None] + phases)).sum(1) + 2 * t[:, None]
  return xs.astype(np.float32)


def test_posthoc_synthesis_recovers_tracked_and_untracked_profiles():
  cfg = _ema_cfg(sigma_rels=[0.05, 0.1, 0.07])
  t_len, every = 4000, 200
  hist = _scan_emas(jnp.asarray(_toy_trajectory(t_len)), cfg)
  profiles = optim.ema_profiles(cfg)
  steps = np.arange(every, t_len + 1, every)
  snap_t, snap_g, snaps = [], [], []
  for name in ('sigma_rel_0p05', 'sigma_rel_0p1'):  # the two MMAudio tracks; 0.07 is the untracked truth
    for s in steps:
      snap_t.append(s)
      snap_g.append(profiles[name][1])
      snaps.append(np.asarray(hist[name][s - 1]))  # ema_count = s
  # A tracked profile at the last snapshot: the weights pick that snapshot.
  w = optim.solve_posthoc_weights(snap_t, snap_g, 0.05)
  one_hot = np.zeros(len(snaps))
  one_hot[len(steps) - 1] = 1.0
  np.testing.assert_allclose(w, one_hot, atol=1e-8)
  np.testing.assert_allclose(optim.synthesize_ema(snaps, w), hist['sigma_rel_0p05'][-1], atol=1e-6)
  # An untracked sigma_rel, at the end and at an earlier step: close to the directly tracked EMA,
  # far closer than the tracked neighbours or the best mix of the two final snapshots.
  for target_step in (t_len, 3000):
    truth = np.asarray(hist['sigma_rel_0p07'][target_step - 1])
    synth = optim.synthesize_ema(snaps, optim.solve_posthoc_weights(snap_t, snap_g, 0.07, target_step))
    neighbour_gap = min(np.abs(truth - np.asarray(hist[n][target_step - 1])).max()
                        for n in ('sigma_rel_0p05', 'sigma_rel_0p1'))
    assert np.abs(synth - truth).max() < 1e-2 * neighbour_gap
  two = optim.solve_posthoc_weights([t_len, t_len], snap_g[::len(steps)], 0.07)
  two_err = np.abs(two[0] * snaps[len(steps) - 1] + two[1] * snaps[-1] - hist['sigma_rel_0p07'][-1]).max()
  assert np.abs(optim.synthesize_ema(snaps, optim.solve_posthoc_weights(snap_t, snap_g, 0.07))
                - hist['sigma_rel_0p07'][-1]).max() < 1e-2 * two_err


def test_synthesize_ema_is_the_weighted_sum_and_checks_inputs():
  a = {'w': np.ones(3, np.float32), 'b': {'x': np.arange(2, dtype=np.float32)}}
  b = jax.tree.map(lambda x: 2 * x + 1, a)
  out = optim.synthesize_ema([a, b], [0.25, -1.5])
  np.testing.assert_allclose(out['w'], 0.25 - 4.5)
  np.testing.assert_allclose(out['b']['x'], 0.25 * np.arange(2) - 1.5 * (2 * np.arange(2) + 1))
  with pytest.raises(ValueError):
    optim.synthesize_ema([a], [0.5, 0.5])
  with pytest.raises(ValueError, match='after the last snapshot'):
    optim.solve_posthoc_weights([10, 20], [6.9, 17.0], 0.05, target_step=30)
