"""MMAudio's mel VAE (`mmaudio/ext/autoencoder/{vae,vae_modules,edm2_utils}.py`) in Flax.

A 1-D conv autoencoder over log-mel frames built from EDM2 magnitude-preserving layers: pixel norm,
mp_silu, mp_sum, bias-free convs. Params hold the *inference* (weight-norm-removed) conv weights;
`visaudio_jax.convert.audio` applies MMAudio's fusion to checkpoint weights. Module and param names
mirror the torch state dict (`convert.state_dict.module_path`), leaf `kernel` is (k, in, out), and
activations are channels-last: mel (B, T, D) <-> latent (B, T / 2, E).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax.audio import mel as mel_lib
from visaudio_jax.model.layers import PRECISIONS, norm_dtype

Array = jax.Array
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """`VAE(data_dim, embed_dim, hidden_dim)`; MMAudio hard-codes the rest, so do we."""
  data_dim: int  # mel bins: 80 (16k) or 128 (44k), the sizes with data_mean/data_std tables
  embed_dim: int  # latent channels E
  hidden_dim: int
  ch_mult: tuple[int, ...] = (1, 2, 4)
  num_res_blocks: int = 2
  down_layers: tuple[int, ...] = (0,)
  kernel_size: int = 3
  clip_act: float = 256.0

  @property
  def downsample(self) -> int:
    return 2 ** len(self.down_layers)


VAE_16K = VAEConfig(data_dim=80, embed_dim=20, hidden_dim=384)
VAE_44K = VAEConfig(data_dim=128, embed_dim=40, hidden_dim=512)
VAE_PRESETS = {'vae_16k': VAE_16K, 'vae_44k': VAE_44K}


def normalize(x: Array, axis: int = -1, eps: float = 1e-4) -> Array:
  """EDM2 pixel norm x / (eps + |x| / sqrt(N)), the norm accumulated in at least float32."""
  norm = jnp.linalg.norm(x.astype(norm_dtype(x.dtype)), axis=axis, keepdims=True)
  return x / (eps + norm / np.sqrt(x.shape[axis])).astype(x.dtype)


def mp_silu(x: Array) -> Array:
  return jax.nn.silu(x) / 0.596


def mp_sum(a: Array, b: Array, t: float = 0.3) -> Array:
  return (a + t * (b - a)) / np.sqrt((1 - t) ** 2 + t ** 2)


class MPConv1D(nn.Module):
  """Bias-free conv with zero padding k // 2; `kernel` is the fused (unit-norm / sqrt(fan_in)) one."""
  features: int
  kernel_size: int
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array, gain: Array | float = 1.0) -> Array:  # (B, T, C_in) -> (B, T, C_out)
    fan_in = x.shape[-1] * self.kernel_size
    kernel = self.param('kernel', nn.initializers.normal(1.0 / np.sqrt(fan_in)),
                        (self.kernel_size, x.shape[-1], self.features))
    dtype = self.dtype or jnp.result_type(x, kernel)
    kernel = (kernel * gain).astype(dtype)
    pad = self.kernel_size // 2
    return jax.lax.conv_general_dilated(x.astype(dtype), kernel, (1,), [(pad, pad)],
                                        dimension_numbers=('NWC', 'WIO', 'NWC'),
                                        precision=PRECISIONS[self.precision])


class ResnetBlock1D(nn.Module):
  features: int
  kernel_size: int = 3
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    def conv(name, k):
      return MPConv1D(self.features, k, self.dtype, self.precision, name=name)

    x = normalize(x)
    h = conv('conv2', self.kernel_size)(mp_silu(conv('conv1', self.kernel_size)(mp_silu(x))))
    if x.shape[-1] != self.features:
      x = conv('nin_shortcut', 1)(x)
    return mp_sum(x, h)


class AttnBlock1D(nn.Module):
  """Single-head self-attention over time; qkv channels are interleaved as (C, 3)."""
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array) -> Array:  # (B, T, C)
    b, t, c = x.shape
    qkv = MPConv1D(3 * c, 1, self.dtype, self.precision, name='qkv')(x).reshape(b, t, c, 3)
    q, k, v = (normalize(qkv[..., j], axis=-1) for j in range(3))  # (B, T, C) each
    logits = jnp.einsum('bqc,bkc->bqk', q, k, precision=PRECISIONS[self.precision]) / np.sqrt(c)
    weights = jax.nn.softmax(logits.astype(norm_dtype(logits.dtype)), axis=-1).astype(v.dtype)
    h = jnp.einsum('bqk,bkc->bqc', weights, v, precision=PRECISIONS[self.precision])
    return mp_sum(x, MPConv1D(c, 1, self.dtype, self.precision, name='proj_out')(h))


class Downsample1D(nn.Module):
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = MPConv1D(c, 1, self.dtype, self.precision, name='conv1')(x)
    b, t, _ = x.shape
    x = x[:, :t // 2 * 2].reshape(b, t // 2, 2, c).mean(axis=2)  # avg_pool1d(2): odd tail dropped
    return MPConv1D(c, 1, self.dtype, self.precision, name='conv2')(x)


class Upsample1D(nn.Module):
  kernel_size: int = 3
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(x, 2, axis=1)  # nearest-exact x2
    return MPConv1D(x.shape[-1], self.kernel_size, self.dtype, self.precision, name='conv')(x)


class _Mid(nn.Module):
  dtype: Any = None
  precision: str = 'highest'
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c, kw = x.shape[-1], dict(dtype=self.dtype, precision=self.precision)
    x = ResnetBlock1D(c, self.kernel_size, name='block_1', **kw)(x)
    x = AttnBlock1D(name='attn_1', **kw)(x)
    return ResnetBlock1D(c, self.kernel_size, name='block_2', **kw)(x)


class _Level(nn.Module):
  """One resolution level: ResBlocks (each clamped to +-clip_act), then the resampler if any."""
  features: int
  num_blocks: int
  resample: str | None  # 'down', 'up' or None
  config: VAEConfig
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, h: Array) -> Array:
    cfg, kw = self.config, dict(dtype=self.dtype, precision=self.precision)
    for i in range(self.num_blocks):
      h = ResnetBlock1D(self.features, cfg.kernel_size, name=f'block_{i}', **kw)(h)
      h = jnp.clip(h, -cfg.clip_act, cfg.clip_act)
    if self.resample == 'down':
      h = Downsample1D(name='downsample', **kw)(h)
    elif self.resample == 'up':
      h = Upsample1D(cfg.kernel_size, name='upsample', **kw)(h)
    return h


class Encoder1D(nn.Module):
  config: VAEConfig
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array) -> Array:  # (B, T, D) normalised mel -> moments (B, T / 2, 2E)
    cfg, kw = self.config, dict(dtype=self.dtype, precision=self.precision)
    h = MPConv1D(cfg.hidden_dim, cfg.kernel_size, name='conv_in', **kw)(x)
    for level, mult in enumerate(cfg.ch_mult):
      resample = 'down' if level in cfg.down_layers else None
      h = _Level(cfg.hidden_dim * mult, cfg.num_res_blocks, resample, cfg, name=f'down_{level}', **kw)(h)
    h = jnp.clip(_Mid(kernel_size=cfg.kernel_size, name='mid', **kw)(h), -cfg.clip_act, cfg.clip_act)
    gain = self.param('learnable_gain', nn.initializers.zeros, ())
    return MPConv1D(2 * cfg.embed_dim, cfg.kernel_size, name='conv_out', **kw)(mp_silu(h), gain + 1)


class Decoder1D(nn.Module):
  config: VAEConfig
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, z: Array) -> Array:  # (B, T', E) -> normalised mel (B, 2T', D)
    cfg, kw = self.config, dict(dtype=self.dtype, precision=self.precision)
    h = MPConv1D(cfg.hidden_dim * cfg.ch_mult[-1], cfg.kernel_size, name='conv_in', **kw)(z)
    h = jnp.clip(_Mid(kernel_size=cfg.kernel_size, name='mid', **kw)(h), -cfg.clip_act, cfg.clip_act)
    for level in reversed(range(len(cfg.ch_mult))):
      resample = 'up' if level - 1 in cfg.down_layers else None
      h = _Level(cfg.hidden_dim * cfg.ch_mult[level], cfg.num_res_blocks + 1, resample, cfg,
                 name=f'up_{level}', **kw)(h)
    gain = self.param('learnable_gain', nn.initializers.zeros, ())
    return MPConv1D(cfg.data_dim, cfg.kernel_size, name='conv_out', **kw)(mp_silu(h), gain + 1)


class Posterior(NamedTuple):
  """MMAudio's DiagonalGaussianDistribution, channels-last (B, T', E)."""
  mean: Array
  std: Array

  def sample(self, eps: Array) -> Array:
    return self.mean + self.std * eps


def posterior(moments: Array) -> Posterior:
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return Posterior(mean, jnp.exp(0.5 * jnp.clip(logvar, *LOGVAR_RANGE)))


def _mel_stat(name: str, dim: int):
  """Default data_mean/data_std: MMAudio's DATA_{MEAN,STD}_{80,128}D constants (checkpoints carry them)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    table = mel_lib.reference_constants().get(f'{name}_{dim}')
    if table is None:
      return jnp.zeros(shape, dtype) if name == 'data_mean' else jnp.ones(shape, dtype)
    return jnp.asarray(table, dtype)
  return init


class VAE(nn.Module):
  """encode: log-mel (B, T, D) -> posterior over (B, T / 2, E); decode: latent -> log-mel.

  `dtype` is the conv compute dtype (None: that of inputs and params, e.g. float64 in x64 runs).
  """
  config: VAEConfig
  dtype: Any = None
  precision: str = 'highest'

  def setup(self):
    cfg, kw = self.config, dict(dtype=self.dtype, precision=self.precision)
    self.data_mean = self.param('data_mean', _mel_stat('data_mean', cfg.data_dim), (cfg.data_dim,))
    self.data_std = self.param('data_std', _mel_stat('data_std', cfg.data_dim), (cfg.data_dim,))
    self.encoder = Encoder1D(cfg, **kw)
    self.decoder = Decoder1D(cfg, **kw)

  def _check(self, x: Array, dim: int, what: str) -> None:
    if x.ndim != 3 or x.shape[-1] != dim:
      raise ValueError(f'VAE.{what}: expected (batch, frames, {dim}), got shape {x.shape}')

  def encode(self, mel: Array) -> Posterior:
    self._check(mel, self.config.data_dim, 'encode')
    if mel.shape[1] < self.config.downsample:
      raise ValueError(f'VAE.encode: need at least {self.config.downsample} mel frames, got {mel.shape[1]}')
    mean, std = self.data_mean.astype(mel.dtype), self.data_std.astype(mel.dtype)
    return posterior(self.encoder((mel - mean) / std))

  def decode(self, z: Array, unnormalize: bool = True) -> Array:
    self._check(z, self.config.embed_dim, 'decode')
    x = self.decoder(z)
    if not unnormalize:
      return x
    return x * self.data_std.astype(x.dtype) + self.data_mean.astype(x.dtype)

  def __call__(self, mel: Array, eps: Array) -> Array:
    """Reconstruction through a posterior sample (used to create both halves' params)."""
    return self.decode(self.encode(mel).sample(eps))


def init_vae(config: VAEConfig, seed: int = 0, dtype=jnp.float32) -> dict:
  """Seeded random params (full-size presets are large: use jax.eval_shape for shapes only)."""
  frames = 2 * config.downsample
  mel = jnp.zeros((1, frames, config.data_dim), dtype)
  eps = jnp.zeros((1, frames // config.downsample, config.embed_dim), dtype)
  return VAE(config).init(jax.random.key(seed), mel, eps)['params']
