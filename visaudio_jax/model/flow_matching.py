"""Conditional flow matching exactly as MMAudio does it, for one or two ears.

Path x_t = (1 - (1 - sigma_min) t) x0 + t x1 from noise x0 (t = 0) to data x1 (t = 1), target velocity
x1 - (1 - sigma_min) x0, t = sigmoid(N(0, 1)) per sample, plain MSE (binaural: summed over ears).
Classifier-free guidance drops the video (clip + sync + PE together) and the text independently,
p = 0.1 each, with per-sample masks. Sampling integrates t = 0 -> 1 with Euler (MMAudio's default, 25
steps) or Heun in a jitted `fori_loop`, the conditional and unconditional passes batched together.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax.model.network import Conditions, FlowNetwork

Array = jax.Array
VelocityFn = Callable[[Array, Array], Array]  # (t scalar, x) -> v


@dataclasses.dataclass(frozen=True)
class FlowMatchingConfig:
  min_sigma: float = 0.0
  t_mean: float = 0.0  # logit-normal time sampling
  t_scale: float = 1.0
  null_video_prob: float = 0.1
  null_text_prob: float = 0.1
  cfg_strength: float = 4.5
  num_steps: int = 25
  method: str = 'euler'  # 'euler' | 'heun'
  # Binaural only, beyond the paper (0 = its loss): extra weight on the inter-ear error (L - R), whose
  # share of the plain MSE is tiny (the ears differ by a few percent of the latent's spread) although
  # it is all the spatial information. A constant positive-definite weighting of the squared error
  # keeps the minimiser (E[v | x_t]), so it changes what training attends to first, not what it learns.
  side_loss_weight: float = 0.0
  # Binaural only, beyond the paper (0 = its independent noise): correlation between the two ears'
  # initial noise, in training and sampling alike. Flow matching works from any source distribution;
  # the ears' latents are nearly equal (correlation ~0.99 on BiAudio-mini), so a correlated source
  # leaves the network only the small inter-ear difference to transport, not two independent draws.
  ear_noise_correlation: float = 0.0


def interpolate(x0: Array, x1: Array, t: Array, min_sigma: float = 0.0) -> Array:
  """x_t for per-sample t (B,)."""
  t = t.reshape(t.shape + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  return (1 - (1 - min_sigma) * t) * x0 + t * x1


def target_velocity(x0: Array, x1: Array, min_sigma: float = 0.0) -> Array:
  return x1 - (1 - min_sigma) * x0


def per_sample_loss(pred_v: Array, x0: Array, x1: Array, min_sigma: float = 0.0,
                    side_weight: float = 0.0) -> Array:
  """MMAudio's per-sample MSE over (N, C); with an ear axis (B, E, N, C), summed over ears -> (B,),
  plus `side_weight` x the MSE of the inter-ear error difference."""
  err = pred_v - target_velocity(x0, x1, min_sigma)
  if err.ndim == 4:
    loss = jnp.square(err).mean(axis=(2, 3)).sum(axis=1)
    if side_weight:
      loss = loss + side_weight * jnp.square(err[:, 0] - err[:, 1]).mean(axis=(1, 2))
    return loss
  return jnp.square(err).mean(axis=tuple(range(1, err.ndim)))


def flow_config(block) -> FlowMatchingConfig:
  """A config file's `flow` block -> the frozen config the jitted functions take."""
  return FlowMatchingConfig(**dict(block))


def correlate_ears(x0: Array, correlation: float) -> Array:
  """Standard normal (B, E=2, N, C) -> each ear still N(0, I), the ears correlated by `correlation`
  (symmetrically: L, R = a z1 +- b z2 with a^2 + b^2 = 1, a^2 - b^2 = correlation). Identity at 0 and
  for mono, so seeded noise is unchanged where the option is off."""
  if not correlation or x0.ndim != 4 or x0.shape[1] != 2:
    return x0
  if not -1.0 < correlation < 1.0:
    raise ValueError(f'ear_noise_correlation must lie in (-1, 1), got {correlation}')
  a, b = np.sqrt((1 + correlation) / 2), np.sqrt((1 - correlation) / 2)
  z1, z2 = x0[:, 0], x0[:, 1]
  return jnp.stack([a * z1 + b * z2, a * z1 - b * z2], axis=1).astype(x0.dtype)


def initial_noise(key: Array, shape: tuple[int, ...], ear_correlation: float = 0.0) -> Array:
  """x0 for training and sampling alike: standard normal, the ears correlated by `ear_correlation`."""
  return correlate_ears(jax.random.normal(key, shape), ear_correlation)


def sample_time(key: Array, batch: int, mean: float = 0.0, scale: float = 1.0) -> Array:
  return jax.nn.sigmoid(jax.random.normal(key, (batch,)) * scale + mean)


def null_condition_masks(key: Array, batch: int, video_prob: float, text_prob: float,
                         video_exists: Array | None = None) -> tuple[Array, Array]:
  """(drop_video, drop_text) bool (B,): independent Bernoulli drops; samples with no video always
  use the null video condition."""
  kv, kt = jax.random.split(key)
  drop_video = jax.random.bernoulli(kv, video_prob, (batch,))
  if video_exists is not None:
    drop_video = drop_video | ~video_exists.astype(bool)
  return drop_video, jax.random.bernoulli(kt, text_prob, (batch,))


def training_loss(model: FlowNetwork, params, batch: dict[str, Array], key: Array,
                  fm: FlowMatchingConfig = FlowMatchingConfig()) -> tuple[Array, dict[str, Array]]:
  """Flow-matching loss for one batch of pre-extracted features.

  batch: latent_mean, latent_std (B, E, N, C) VAE posteriors; clip_f, sync_f, text_f (and pe_f);
  optional video_exists (B,). x1 is re-sampled from the posterior each step, then normalised.
  """
  k_post, k_noise, k_t, k_drop = jax.random.split(key, 4)
  post_mean = batch['latent_mean'].astype(jnp.float32)
  b = post_mean.shape[0]
  x1 = post_mean + batch['latent_std'].astype(jnp.float32) * jax.random.normal(k_post, post_mean.shape)
  x1 = model.apply(params, x1, method=FlowNetwork.normalize)
  x0 = initial_noise(k_noise, x1.shape, fm.ear_noise_correlation)
  t = sample_time(k_t, b, fm.t_mean, fm.t_scale)
  drop_video, drop_text = null_condition_masks(k_drop, b, fm.null_video_prob, fm.null_text_prob,
                                               batch.get('video_exists'))
  feats = {k: batch[k] for k in ('clip_f', 'sync_f', 'text_f', 'pe_f') if k in batch}
  feats = model.apply(params, drop_video, drop_text, **feats, method=FlowNetwork.drop_conditions)
  xt = interpolate(x0, x1, t, fm.min_sigma)
  pred = model.apply(params, xt, t, **feats).astype(jnp.float32)
  loss = per_sample_loss(pred, x0, x1, fm.min_sigma, fm.side_loss_weight)
  return loss.mean(), {'loss_per_sample': loss, 't': t, 'drop_video': drop_video, 'drop_text': drop_text}


# ---- sampling -------------------------------------------------------------------------------------

def time_grid(num_steps: int, min_sigma: float = 0.0) -> np.ndarray:
  """torch.linspace(0, 1 - min_sigma, steps + 1) in float32, as MMAudio's sampler builds it."""
  return np.linspace(0.0, 1.0 - min_sigma, num_steps + 1, dtype=np.float32)


def guided_velocity(model: FlowNetwork, params, cond: Conditions, uncond: Conditions,
                    cfg_strength: float, tables=None) -> VelocityFn:
  """MMAudio's ode_wrapper: w v_cond + (1 - w) v_uncond (conditional only when w < 1), with both
  passes in one network call on a doubled batch."""
  def predict(x, t, c):
    return model.apply(params, x, t, c, tables, method=FlowNetwork.predict_flow)

  if cfg_strength < 1.0:
    return lambda t, x: predict(x, jnp.full((x.shape[0],), t, x.dtype), cond)
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u.astype(c.dtype)]), cond, uncond)

  def velocity(t, x):
    b = x.shape[0]
    v = predict(jnp.concatenate([x, x]), jnp.full((2 * b,), t, x.dtype), both)
    return cfg_strength * v[:b] + (1 - cfg_strength) * v[b:]

  return velocity


def integrate(velocity: VelocityFn, x0: Array, num_steps: int = 25, method: str = 'euler',
              min_sigma: float = 0.0, return_trajectory: bool = False,
              constrain: Callable[[Array, Array], Array] | None = None):
  """Solve dx/dt = v(t, x) from t = 0 to 1 - min_sigma. Euler never evaluates t = 1. The grid and
  dt are float32 (as in MMAudio), added in x's dtype. `constrain(t, x) -> x` is applied to the state
  at the start of every step (inpainting). Returns x1 (and the (steps+1, ...) states)."""
  if method not in ('euler', 'heun'):
    raise ValueError(f"sampler method must be 'euler' or 'heun', got {method!r}")
  grid = jnp.asarray(time_grid(num_steps, min_sigma))

  def step(i, x):
    t, t_next = grid[i], grid[i + 1]
    if constrain is not None:
      x = constrain(t.astype(x.dtype), x)
    dt = (t_next - t).astype(x.dtype)
    v = velocity(t.astype(x.dtype), x)
    if method == 'euler':
      return x + dt * v
    x_pred = x + dt * v
    return x + dt * 0.5 * (v + velocity(t_next.astype(x.dtype), x_pred))

  if not return_trajectory:
    return jax.lax.fori_loop(0, num_steps, step, x0)

  def scan_step(x, i):
    x = step(i, x)
    return x, x

  x1, xs = jax.lax.scan(scan_step, x0, jnp.arange(num_steps))
  return x1, jnp.concatenate([x0[None], xs])


def inpainting(x0: Array, known: Array, mask: Array, min_sigma: float = 0.0, release_t: float = 1.0):
  """Flow-matching inpainting as an `integrate` constraint: while t < release_t, the latent frames
  where mask (B, N) is 1 are put back on the path between this sample's own noise x0 and the known
  (normalised) data latent, so the free frames are generated to continue them; after release_t the
  network reconciles both for the last steps. x0, known: (B, E, N, C) or (B, N, C)."""
  m = mask.reshape(mask.shape[:1] + (1,) * (x0.ndim - 3) + mask.shape[1:] + (1,)).astype(x0.dtype)

  def constrain(t, x):
    on = m * (t < release_t).astype(x.dtype)
    return x + on * ((1 - (1 - min_sigma) * t) * x0 + t * known.astype(x.dtype) - x)

  return constrain


def generate(model: FlowNetwork, params, features: dict[str, Array], x0: Array,
             fm: FlowMatchingConfig = FlowMatchingConfig(), negative_text_f: Array | None = None,
             tables=None, known: Array | None = None, known_mask: Array | None = None,
             release_t: float = 1.0) -> Array:
  """Features -> un-normalised latents (B, E, N, C): conditions projected once, null conditions
  once, then the ODE. With `known` latents (un-normalised, as this returns them) and `known_mask`
  (B, N), those frames are inpainted (`inpainting`) until `release_t`: how a long video's window
  continues the previous one. Jit it with `model` and `fm` static (see `make_sampler`)."""
  cond = model.apply(params, **features, tables=tables, method=FlowNetwork.preprocess_conditions)
  uncond = model.apply(params, x0.shape[0], negative_text_f, tables, method=FlowNetwork.empty_conditions)
  velocity = guided_velocity(model, params, cond, uncond, fm.cfg_strength, tables)
  constrain = None
  if known is not None:
    target = model.apply(params, known, method=FlowNetwork.normalize)
    constrain = inpainting(x0, target, known_mask, fm.min_sigma, release_t)
  x1 = integrate(velocity, x0, fm.num_steps, fm.method, fm.min_sigma, constrain=constrain)
  return model.apply(params, x1, method=FlowNetwork.unnormalize)


def make_sampler(model: FlowNetwork, fm: FlowMatchingConfig = FlowMatchingConfig()):
  """A jitted `sampler(params, features, x0, negative_text_f=None) -> latents`."""
  return jax.jit(lambda params, features, x0, negative_text_f=None: generate(
      model, params, features, x0, fm, negative_text_f))
