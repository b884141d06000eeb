"""Flow matching beyond the golden fixtures (those are in test_mmaudio_parity.py): CFG dropout,
binaural loss, Heun, the jitted sampler, and that training on a fixed batch lowers the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from test_network import _features, _tiny_binaural, fresh_params
from visaudio_jax.model import flow_matching as fm
from visaudio_jax.model.network import FlowNetwork


def test_null_condition_masks_rates_and_missing_video():
  drop_v, drop_t = fm.null_condition_masks(jax.random.key(0), 20000, 0.1, 0.1)
  assert abs(float(drop_v.mean()) - 0.1) < 0.01 and abs(float(drop_t.mean()) - 0.1) < 0.01
  assert abs(float((drop_v & drop_t).mean()) - 0.01) < 0.004  # independent
  exists = jnp.array([True, False, True, False])
  drop_v, _ = fm.null_condition_masks(jax.random.key(1), 4, 0.0, 0.0, exists)
  assert drop_v.tolist() == [False, True, False, True]


def test_drop_conditions_substitutes_learned_null_features_per_sample():
  cfg = _tiny_binaural()
  params = fresh_params(cfg)
  params = {'params': params['params'] | {'empty_clip_feat': np.arange(cfg.clip_dim, dtype=np.float32)}}
  feats = _features(cfg, 3)
  feats.pop('latent')
  out = jax.jit(lambda p, f: FlowNetwork(cfg).apply(p, jnp.array([True, False, False]), jnp.array([False, False, True]),
                                                    **f, method=FlowNetwork.drop_conditions))(params, feats)
  np.testing.assert_array_equal(out['clip_f'][0], np.broadcast_to(np.arange(cfg.clip_dim), (9, cfg.clip_dim)))
  np.testing.assert_array_equal(out['clip_f'][1:], feats['clip_f'][1:])
  np.testing.assert_array_equal(out['pe_f'][0], 0.0)  # video dropped: PE too
  np.testing.assert_array_equal(out['sync_f'][2], feats['sync_f'][2])
  np.testing.assert_array_equal(out['text_f'][2], params['params']['empty_string_feat'])
  np.testing.assert_array_equal(out['text_f'][:2], feats['text_f'][:2])


def test_binaural_loss_is_the_sum_of_per_ear_mmaudio_losses():
  rng = np.random.default_rng(0)
  v, x0, x1 = (jnp.asarray(rng.standard_normal((3, 2, 5, 4))) for _ in range(3))
  both = fm.per_sample_loss(v, x0, x1)
  per_ear = [fm.per_sample_loss(v[:, e], x0[:, e], x1[:, e]) for e in range(2)]
  np.testing.assert_allclose(both, per_ear[0] + per_ear[1], rtol=1e-6)
  np.testing.assert_allclose(per_ear[0], jnp.mean((v[:, 0] - (x1[:, 0] - x0[:, 0])) ** 2, axis=(1, 2)), rtol=1e-6)


def test_side_weight_adds_the_inter_ear_error_and_keeps_the_minimiser():
  rng = np.random.default_rng(1)
  v, x0, x1 = (jnp.asarray(rng.standard_normal((3, 2, 5, 4))) for _ in range(3))
  err = np.asarray(v - (x1 - x0))
  expected = (err**2).mean((2, 3)).sum(1) + 2.5 * ((err[:, 0] - err[:, 1]) ** 2).mean((1, 2))
  np.testing.assert_allclose(fm.per_sample_loss(v, x0, x1, side_weight=2.5), expected, rtol=1e-6)
  # The best single prediction for many (x0, x1) draws is still their mean target velocity: the
  # weighted loss's gradient vanishes there, as the plain loss's does, and not elsewhere.
  x0s, x1s = (jnp.asarray(rng.standard_normal((64, 2, 5, 4))) for _ in range(2))
  mean_target = (x1s - x0s).mean(0, keepdims=True)
  grad = jax.grad(lambda p, w: fm.per_sample_loss(jnp.broadcast_to(p, x0s.shape), x0s, x1s, side_weight=w).mean())
  for weight in (0.0, 4.0):
    np.testing.assert_allclose(grad(mean_target, weight), 0.0, atol=1e-6)
    assert float(jnp.abs(grad(mean_target + 0.1, weight)).max()) > 1e-3


def test_ear_noise_correlation_keeps_each_ear_standard_normal():
  z = jax.random.normal(jax.random.key(0), (4000, 2, 8, 4))
  x0 = np.asarray(fm.correlate_ears(z, 0.9))
  left, right = x0[:, 0].ravel(), x0[:, 1].ravel()
  np.testing.assert_allclose([left.mean(), right.mean()], 0.0, atol=0.01)
  np.testing.assert_allclose([left.std(), right.std()], 1.0, atol=0.01)
  np.testing.assert_allclose(np.corrcoef(left, right)[0, 1], 0.9, atol=0.005)
  assert fm.correlate_ears(z, 0.0) is z
  np.testing.assert_array_equal(fm.correlate_ears(z[:, :1], 0.9), z[:, :1])  # mono: unchanged
  with pytest.raises(ValueError, match='ear_noise_correlation'):
    fm.correlate_ears(z, 1.0)


def test_heun_is_second_order_and_euler_first():
  """dx/dt = x from t=0 to 1: x1 = e x0. Halving the step divides Euler's error by 2, Heun's by 4."""
  x0 = jnp.ones((1,))
  err = lambda method, n: float(jnp.abs(fm.integrate(lambda t, x: x, x0, n, method)[0] - np.e))
  assert 1.8 < err('euler', 10) / err('euler', 20) < 2.2
  assert 3.6 < err('heun', 10) / err('heun', 20) < 4.4
  assert err('heun', 25) < 1e-3
  with pytest.raises(ValueError, match='euler'):
    fm.integrate(lambda t, x: x, x0, 3, 'rk4')


@pytest.mark.parametrize('method', ['euler', 'heun'])
def test_jitted_sampler_with_batched_cfg_and_negative_text(method):
  cfg = _tiny_binaural()
  params = fresh_params(cfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params)
  feats = _features(cfg, 2)
  x0 = feats.pop('latent')
  model = FlowNetwork(cfg)
  sampler = fm.make_sampler(model, fm.FlowMatchingConfig(num_steps=4, method=method))
  out = sampler(params, feats, x0)
  assert out.shape == x0.shape and bool(jnp.isfinite(out).all())
  neg = sampler(params, feats, x0, feats['text_f'] * 0.5)
  assert float(jnp.abs(neg - out).max()) > 1e-4  # the negative prompt changes the unconditional branch
  # The batched conditional/unconditional pass equals two separate passes.
  if method == 'heun':
    return
  cond = jax.jit(lambda p, f: model.apply(p, **f, method=FlowNetwork.preprocess_conditions))(params, feats)
  uncond = jax.jit(lambda p: model.apply(p, 2, method=FlowNetwork.empty_conditions))(params)
  t = jnp.float32(0.3)
  v = jax.jit(lambda p, c, u: fm.guided_velocity(model, p, c, u, 4.5)(t, x0))(params, cond, uncond)
  pf = jax.jit(lambda p, c: model.apply(p, x0, jnp.full((2,), t), c, method=FlowNetwork.predict_flow))
  np.testing.assert_allclose(v, 4.5 * pf(params, cond) - 3.5 * pf(params, uncond), rtol=1e-4, atol=1e-5)


def test_training_steps_lower_the_loss_on_a_fixed_batch():
  cfg = _tiny_binaural(depth=3, fused_depth=1)
  model = FlowNetwork(cfg)
  params = fresh_params(cfg)
  feats = _features(cfg, 4, seed=3)
  latent = feats.pop('latent')
  batch = feats | {'latent_mean': latent, 'latent_std': 0.1 * jnp.ones_like(latent)}
  tx = optax.adam(3e-3)
  opt = tx.init(params)
  key = jax.random.key(0)

  @jax.jit
  def step(params, opt):
    (loss, aux), grads = jax.value_and_grad(lambda p: fm.training_loss(model, p, batch, key), has_aux=True)(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt, loss, aux

  losses = []
  for _ in range(8):
    params, opt, loss, aux = step(params, opt)
    losses.append(float(loss))
  assert aux['loss_per_sample'].shape == (4,)
  assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
