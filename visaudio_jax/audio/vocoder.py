"""BigVGAN vocoders: log-mel (B, T, num_mels) -> waveform (B, T * hop_length).

A port of the two generators MMAudio uses, MMAudio's 16 kHz BigVGAN (v1 code, `ext/bigvgan`) and
NVIDIA's 44.1 kHz BigVGAN-v2 (`ext/bigvgan_v2`, pure-torch path). Both compute the same network;
v2 only adds the switches `use_tanh_at_final` (else clamp to [-1, 1]) and `use_bias_at_final`.

Activations are channels-last (B, T, C) and conv kernels are (K, in, out). Weights are the
inference (weight-norm fused) form; `visaudio_jax.convert.bigvgan` folds checkpoints into it.
Submodule and param names mirror the torch state dict through
`visaudio_jax.convert.state_dict.module_path` (`resblocks.3.convs1.2.weight` ->
`resblocks_3/convs1_2/kernel`). The anti-alias filter buffers are not params: every copy in a
checkpoint equals the float32 constant `ANTIALIAS_FILTER`, which the converter checks.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax.model.layers import PRECISIONS, torch_conv_init

Array = jax.Array

# kaiser_sinc_filter(0.25, 0.3, 12) as torch builds it in float32: bitwise the buffers
# `...upsample.filter` / `...downsample.lowpass.filter` of every BigVGAN checkpoint. Recomputing it
# in float64 moves the taps by ~2.6e-8, visible in float64 parity, so the rounded values are kept.
ANTIALIAS_FILTER = np.array([0.0020289647, 0.009389466, -0.025543459, -0.057657383, 0.12857258,
                             0.4432098, 0.4432098, 0.12857258, -0.057657383, -0.025543459,
                             0.009389466, 0.0020289647], np.float32)
RATIO = 2  # Activation1d's up/down sampling ratio


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> np.ndarray:
  """BigVGAN's `kaiser_sinc_filter1d` in float64: a Kaiser-windowed sinc low-pass, taps summing to 1."""
  half_size = kernel_size // 2
  a = 2.285 * (half_size - 1) * np.pi * 4 * half_width + 7.95  # stop-band attenuation in dB
  if a > 50.0:
    beta = 0.1102 * (a - 8.7)
  elif a >= 21.0:
    beta = 0.5842 * (a - 21) ** 0.4 + 0.07886 * (a - 21.0)
  else:
    beta = 0.0
  window = np.kaiser(kernel_size, beta)  # symmetric, as torch.kaiser_window(periodic=False)
  if kernel_size % 2 == 0:
    t = np.arange(-half_size, half_size) + 0.5
  else:
    t = np.arange(kernel_size) - half_size
  if cutoff == 0:
    return np.zeros(kernel_size)
  h = 2 * cutoff * window * np.sinc(2 * cutoff * t)
  return h / h.sum()


@dataclasses.dataclass(frozen=True)
class VocoderConfig:
  """A BigVGAN generator (the architecture fields of BigVGAN's config files)."""
  num_mels: int
  upsample_rates: tuple[int, ...]
  upsample_kernel_sizes: tuple[int, ...]
  upsample_initial_channel: int
  resblock: str  # '1': AMPBlock1 (two convs per dilation), '2': AMPBlock2 (one)
  resblock_kernel_sizes: tuple[int, ...]
  resblock_dilation_sizes: tuple[tuple[int, ...], ...]
  activation: str = 'snakebeta'  # 'snake' | 'snakebeta'
  snake_logscale: bool = True  # stored alpha/beta are logs
  use_tanh_at_final: bool = True  # else clamp to [-1, 1] (BigVGAN-v2 switch)
  use_bias_at_final: bool = True  # conv_post has a bias (BigVGAN-v2 switch)

  def __post_init__(self):
    # Lists (from JSON / YAML configs) become tuples: the config must be hashable for jit.
    for name in ('upsample_rates', 'upsample_kernel_sizes', 'resblock_kernel_sizes'):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    object.__setattr__(self, 'resblock_dilation_sizes',
                       tuple(tuple(int(d) for d in ds) for ds in self.resblock_dilation_sizes))
    if self.resblock not in ('1', '2'):
      raise ValueError(f"VocoderConfig.resblock must be '1' or '2', got {self.resblock!r}")
    if self.activation not in ('snake', 'snakebeta'):
      raise ValueError(f"VocoderConfig.activation must be 'snake' or 'snakebeta', got {self.activation!r}")
    if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
      raise ValueError(f'upsample_rates {self.upsample_rates} and upsample_kernel_sizes '
                       f'{self.upsample_kernel_sizes} differ in length')
    if any(k < u or (k - u) % 2 for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes)):
      raise ValueError('each upsample kernel size k needs k >= rate u with k - u even (output length '
                       f'T * u), got rates {self.upsample_rates}, kernels {self.upsample_kernel_sizes}')
    if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
      raise ValueError(f'resblock_kernel_sizes {self.resblock_kernel_sizes} and resblock_dilation_sizes '
                       f'{self.resblock_dilation_sizes} differ in length')
    if any(k % 2 == 0 for k in self.resblock_kernel_sizes):
      raise ValueError(f'resblock kernel sizes must be odd, got {self.resblock_kernel_sizes}')
    if self.upsample_initial_channel % 2 ** len(self.upsample_rates):
      raise ValueError(f'upsample_initial_channel {self.upsample_initial_channel} is halved '
                       f'{len(self.upsample_rates)} times and must stay an integer')

  @property
  def hop_length(self) -> int:
    return int(np.prod(self.upsample_rates))

  def channels(self, stage: int) -> int:
    """Width after `stage` upsampling stages (stage 0: conv_pre's output)."""
    return self.upsample_initial_channel // 2 ** stage


_AMP_BLOCKS = dict(resblock_kernel_sizes=(3, 7, 11), resblock_dilation_sizes=((1, 3, 5),) * 3)
# MMAudio's `ext/bigvgan/bigvgan_vocoder.yml` (checkpoint `best_netG.pt`).
BIGVGAN_16K = VocoderConfig(num_mels=80, upsample_rates=(4, 4, 2, 2, 2, 2),
                            upsample_kernel_sizes=(8, 8, 4, 4, 4, 4), upsample_initial_channel=1536,
                            resblock='1', **_AMP_BLOCKS)
# NVIDIA's `bigvgan_v2_44khz_128band_512x`.
BIGVGAN_V2_44K = VocoderConfig(num_mels=128, upsample_rates=(8, 4, 2, 2, 2, 2),
                               upsample_kernel_sizes=(16, 8, 4, 4, 4, 4), upsample_initial_channel=1536,
                               resblock='1', **_AMP_BLOCKS, use_tanh_at_final=False,
                               use_bias_at_final=False)
VOCODER_PRESETS = {'bigvgan_16k': BIGVGAN_16K, 'bigvgan_v2_44k': BIGVGAN_V2_44K}


class Conv1d(nn.Module):
  """torch Conv1d (stride 1, zero 'same' padding dilation * (K - 1) / 2); kernel (K, in, out).

  `init_std` set: BigVGAN's `init_weights` N(0, init_std); else torch's default init.
  """
  features: int
  kernel_size: int
  dilation: int = 1
  use_bias: bool = True
  init_std: float | None = None
  dtype: Any = jnp.float32
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array) -> Array:  # (B, T, in) -> (B, T, out)
    fan_in = x.shape[-1] * self.kernel_size
    init = torch_conv_init(fan_in) if self.init_std is None else nn.initializers.normal(self.init_std)
    kernel = self.param('kernel', init, (self.kernel_size, x.shape[-1], self.features), jnp.float32)
    pad = self.dilation * (self.kernel_size - 1) // 2
    y = jax.lax.conv_general_dilated(x, jnp.asarray(kernel, self.dtype), (1,), [(pad, pad)],
                                     rhs_dilation=(self.dilation,),
                                     dimension_numbers=('NWC', 'WIO', 'NWC'),
                                     precision=PRECISIONS[self.precision])
    if self.use_bias:
      y = y + jnp.asarray(self.param('bias', torch_conv_init(fan_in), (self.features,), jnp.float32),
                          self.dtype)
    return y


class ConvTranspose1d(nn.Module):
  """torch ConvTranspose1d with padding (K - stride) / 2: output length exactly T * stride.

  torch scatters y_full[i * s + k] += x[i] W[k] and crops `padding` from each end; that is a
  correlation of the input dilated by s (zeros between samples), zero-padded by K - 1 - padding,
  with the kernel flipped in time. Kernel (K, in, out), from torch's (in, out, K).
  """
  features: int
  kernel_size: int
  stride: int
  init_std: float = 0.01
  dtype: Any = jnp.float32
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array) -> Array:  # (B, T, in) -> (B, T * stride, out)
    k, s = self.kernel_size, self.stride
    kernel = self.param('kernel', nn.initializers.normal(self.init_std), (k, x.shape[-1], self.features),
                        jnp.float32)
    pad = k - 1 - (k - s) // 2
    y = jax.lax.conv_general_dilated(x, jnp.asarray(kernel, self.dtype)[::-1], (1,), [(pad, pad)],
                                     lhs_dilation=(s,), dimension_numbers=('NWC', 'WIO', 'NWC'),
                                     precision=PRECISIONS[self.precision])
    fan_in = self.features * k  # torch's fan_in of an (in, out, K) weight
    return y + jnp.asarray(self.param('bias', torch_conv_init(fan_in), (self.features,), jnp.float32),
                           self.dtype)


class Snake(nn.Module):
  """Snake x + sin^2(a x) / a, or SnakeBeta x + sin^2(a x) / b; per-channel a (and b), logs if `logscale`."""
  use_beta: bool
  logscale: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:  # (B, T, C)
    init = nn.initializers.zeros if self.logscale else nn.initializers.ones  # a = b = 1 either way
    alpha = jnp.asarray(self.param('alpha', init, (x.shape[-1],), jnp.float32), self.dtype)
    beta = alpha
    if self.use_beta:
      beta = jnp.asarray(self.param('beta', init, (x.shape[-1],), jnp.float32), self.dtype)
    if self.logscale:
      alpha, beta = jnp.exp(alpha), jnp.exp(beta)
    return x + 1.0 / (beta + 1e-9) * jnp.square(jnp.sin(x * alpha))  # torch's order of operations


def _depthwise(x: Array, taps: list[float], stride: int = 1, dilation: int = 1,
               padding: tuple[int, int] = (0, 0)) -> Array:
  """Every channel of (B, T, C) correlated with the same taps at `stride`, after inserting
  `dilation - 1` zeros between samples and zero-padding the ends by `padding` (negative: crop).

  A sum of shifted slices rather than a grouped conv (feature_group_count=C): with grouped convs
  the whole vocoder ran 2.4x slower on an H200 (full 44k model, 8 s, float32) and 5x slower on CPU
  (reduced model), for the same float64 parity.
  The taps are Python floats, so they take the compute dtype of x (exactly, from float32 up).
  """
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (*padding, dilation - 1), (0, 0, 0)])
  b, t, c = x.shape
  n = (t - len(taps)) // stride + 1
  return sum(tap * jax.lax.slice(x, (0, i, 0), (b, i + stride * (n - 1) + 1, c), (1, stride, 1))
             for i, tap in enumerate(taps))


class Activation1d(nn.Module):
  """Anti-aliased activation: 2x upsample, Snake(Beta) at the doubled rate, low-pass and 2x downsample.

  Both resamplers pad by replicating the edge samples, as BigVGAN's `alias_free_torch` does.
  """
  use_beta: bool
  logscale: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:  # (B, T, C) -> (B, T, C)
    taps = ANTIALIAS_FILTER.tolist()  # exact float32 values as Python floats
    k = len(taps)
    # UpSample1d: replicate-pad by k/2 - 1 = 5, transposed conv (stride 2, kernel 2 f), then crop
    # 15 from each end: a correlation of the 2x zero-stuffed input with the flipped kernel, zero
    # padded by k - 1 - 15 (negative: the crop).
    pad = k // RATIO - 1
    crop_left, crop_right = pad * RATIO + (k - RATIO) // 2, pad * RATIO + (k - RATIO + 1) // 2
    x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode='edge')  # (B, T + 10, C)
    x = _depthwise(x, [RATIO * tap for tap in reversed(taps)], dilation=RATIO,
                   padding=(k - 1 - crop_left, k - 1 - crop_right))  # (B, 2T, C); 2 f is exact
    x = Snake(self.use_beta, self.logscale, self.dtype, name='act')(x)
    # LowPassFilter1d (even k): replicate-pad by (k/2 - 1, k/2) = (5, 6), correlate with f at stride 2.
    x = jnp.pad(x, ((0, 0), (k // 2 - 1, k // 2), (0, 0)), mode='edge')  # (B, 2T + 11, C)
    return _depthwise(x, taps, stride=RATIO)  # (B, T, C)


class AMPBlock(nn.Module):
  """AMPBlock1 (resblock '1'): x += convs2[n](act(convs1[n](act(x)))), convs1[n] dilated by d_n.
  AMPBlock2 (resblock '2'): x += convs[n](act(x)), convs[n] dilated by d_n."""
  config: VocoderConfig
  channels: int
  kernel_size: int
  dilations: tuple[int, ...]
  dtype: Any = jnp.float32
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array) -> Array:  # (B, T, C)
    cfg = self.config
    common = dict(dtype=self.dtype, precision=self.precision)

    def act(index):
      return Activation1d(cfg.activation == 'snakebeta', cfg.snake_logscale, self.dtype,
                          name=f'activations_{index}')

    def conv(name, dilation):
      return Conv1d(self.channels, self.kernel_size, dilation, init_std=0.01, **common, name=name)

    for n, d in enumerate(self.dilations):
      if cfg.resblock == '1':  # activations 2n and 2n + 1 precede convs1[n] and convs2[n]
        h = conv(f'convs2_{n}', 1)(act(2 * n + 1)(conv(f'convs1_{n}', d)(act(2 * n)(x))))
      else:
        h = conv(f'convs_{n}', d)(act(n)(x))
      x = h + x
    return x


class Vocoder(nn.Module):
  """BigVGAN generator. mel (B, T, num_mels), channels-last -> waveform (B, T * hop_length) in [-1, 1]."""
  config: VocoderConfig
  dtype: Any = jnp.float32
  precision: str = 'highest'

  @nn.compact
  def __call__(self, mel: Array) -> Array:
    cfg = self.config
    if mel.ndim != 3 or mel.shape[-1] != cfg.num_mels:
      raise ValueError(f'Vocoder expects mel (B, T, num_mels={cfg.num_mels}), channels-last; '
                       f'got shape {tuple(mel.shape)}')
    common = dict(dtype=self.dtype, precision=self.precision)
    num_kernels = len(cfg.resblock_kernel_sizes)
    x = Conv1d(cfg.channels(0), 7, **common, name='conv_pre')(mel.astype(self.dtype))  # (B, T, C0)
    for i, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
      ch = cfg.channels(i + 1)
      x = ConvTranspose1d(ch, kernel, rate, **common, name=f'ups_{i}_0')(x)  # (B, T_i * rate, ch)
      # Multi-receptive-field fusion: every AMP block sees the same input; their mean goes on.
      xs = None
      for j, (k, dils) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)):
        y = AMPBlock(cfg, ch, k, dils, **common, name=f'resblocks_{i * num_kernels + j}')(x)
        xs = y if xs is None else xs + y
      x = xs / num_kernels
    x = Activation1d(cfg.activation == 'snakebeta', cfg.snake_logscale, self.dtype,
                     name='activation_post')(x)
    x = Conv1d(1, 7, use_bias=cfg.use_bias_at_final, init_std=0.01, **common, name='conv_post')(x)
    x = jnp.tanh(x) if cfg.use_tanh_at_final else jnp.clip(x, -1.0, 1.0)  # (B, T * hop, 1)
    return x[..., 0]


def init_vocoder(config: VocoderConfig, seed: int = 0, dtype=jnp.float32) -> dict:
  """Fresh params (BigVGAN's init, weight norm already fused), cast to `dtype`."""
  mel = jnp.zeros((1, 1, config.num_mels), jnp.float32)  # one frame: shapes do not depend on T
  init = jax.jit(lambda key: Vocoder(config).init(key, mel)['params'])  # eager init dispatches op by op
  return jax.tree.map(lambda p: p.astype(dtype), init(jax.random.PRNGKey(seed)))


def vocode(config: VocoderConfig, params: dict, mel: Array, dtype=None,
           precision: str = 'highest') -> Array:
  """mel (B, T, num_mels) -> waveform (B, T * hop_length); computed in `dtype` (None: mel's dtype).

  Pure, so it jits with `config` (hashable) and `dtype` / `precision` static.
  """
  dtype = jnp.result_type(mel) if dtype is None else dtype
  return Vocoder(config, dtype=dtype, precision=precision).apply({'params': params}, mel)
