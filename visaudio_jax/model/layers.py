"""Low-level layers with logical axis names and optional per-ear branch weights.

A layer built with `branches=E > 0` holds one set of weights per ear (leading param axis 'ear') and
takes inputs shaped (..., E, L, features); with `branches=0` its weights are shared and any leading
axes are batch-like. Numerics follow MMAudio: LayerNorm without affine (eps 1e-5) and RMSNorm (eps =
float32 machine epsilon) computed in at least float32; SwiGLU MLPs without biases.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Initializer = Callable[..., Array]

PRECISIONS = {'default': None, 'high': jax.lax.Precision.HIGH, 'highest': jax.lax.Precision.HIGHEST}


def norm_dtype(dtype) -> jnp.dtype:
  """Norms, softmax, RoPE and time embeddings run in float32, or float64 for float64 runs."""
  return jnp.promote_types(jnp.float32, dtype)


def linear_init(in_axes: Sequence[int], out_axes: Sequence[int], batch_axes=()) -> Initializer:
  """Xavier-uniform, as MMAudio's `initialize_weights` does for every nn.Linear."""
  return nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=tuple(in_axes),
                                          out_axis=tuple(out_axes), batch_axis=tuple(batch_axes))


def torch_conv_init(fan_in: int) -> Initializer:
  """PyTorch's default Conv1d init (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def partitioned(init: Initializer, names: Sequence[str | None]) -> Initializer:
  return nn.with_logical_partitioning(init, tuple(names))


class Dense(nn.Module):
  """y = x W + b over the last axis; W is (in, *out), or (E, in, *out) with per-ear branches."""
  features: Sequence[int]
  in_name: str | None
  out_names: Sequence[str | None]
  use_bias: bool = True
  branches: int = 0
  kernel_init: Initializer | None = None  # default: Xavier-uniform
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: str = 'default'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = tuple(self.features)
    lead = (self.branches,) if self.branches else ()
    lead_names = ('ear',) if self.branches else ()
    n_lead = len(lead)
    shape = lead + (x.shape[-1],) + features
    init = self.kernel_init or linear_init([n_lead], range(n_lead + 1, len(shape)), range(n_lead))
    kernel = self.param('kernel', partitioned(init, lead_names + (self.in_name, *self.out_names)),
                        shape, self.param_dtype)
    x, kernel = x.astype(self.dtype), jnp.asarray(kernel, self.dtype)
    out_letters = 'opqrs'[:len(features)]
    if self.branches:
      y = jnp.einsum(f'...eli,ei{out_letters}->...el{out_letters}', x, kernel,
                     precision=PRECISIONS[self.precision])
    else:
      y = jnp.einsum(f'...i,i{out_letters}->...{out_letters}', x, kernel,
                     precision=PRECISIONS[self.precision])
    if self.use_bias:
      bias = self.param('bias', partitioned(nn.initializers.zeros, lead_names + tuple(self.out_names)),
                        lead + features, self.param_dtype)
      bias = jnp.asarray(bias, self.dtype)
      y = y + (bias[:, None] if self.branches else bias)
    return y


class Conv1d(nn.Module):
  """Channel-last 1-D convolution, stride 1, 'same' zero padding (MMAudio's ChannelLastConv1d).

  Kernel (k, in, out), or (E, k, in, out) with branches; inputs (..., L, in) or (..., E, L, in).
  """
  features: int
  kernel_size: int
  in_name: str | None
  out_name: str | None
  use_bias: bool = True
  branches: int = 0
  zero_init: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: str = 'default'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    lead = (self.branches,) if self.branches else ()
    lead_names = ('ear',) if self.branches else ()
    fan_in = x.shape[-1] * self.kernel_size
    w_init = nn.initializers.zeros if self.zero_init else torch_conv_init(fan_in)
    kernel = self.param('kernel', partitioned(w_init, lead_names + ('conv_window', self.in_name,
                                                                   self.out_name)),
                        lead + (self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), jnp.asarray(kernel, self.dtype)
    pad = (self.kernel_size - 1) // 2

    def conv(x, k):  # (B', L, in), (k, in, out)
      return jax.lax.conv_general_dilated(x, k, (1,), [(pad, pad)], dimension_numbers=('NWC', 'WIO', 'NWC'),
                                          precision=PRECISIONS[self.precision])

    if self.branches:
      # One convolution per ear, not vmap: vmap makes a grouped convolution whose kernel gradient
      # (batch_group_count) runs ~300x slower on XLA CPU (67 s vs 0.2 s per tiny training step).
      y = jnp.stack([conv(x[..., e, :, :].reshape((-1,) + x.shape[-2:]), kernel[e]).reshape(
          x.shape[:-3] + (x.shape[-2], self.features)) for e in range(self.branches)], axis=-3)
    else:
      xb = x.reshape((-1,) + x.shape[-2:])
      y = conv(xb, kernel).reshape(x.shape[:-1] + (self.features,))
    if self.use_bias:
      b_init = nn.initializers.zeros if self.zero_init else torch_conv_init(fan_in)
      bias = self.param('bias', partitioned(b_init, lead_names + (self.out_name,)),
                        lead + (self.features,), self.param_dtype)
      bias = jnp.asarray(bias, self.dtype)
      y = y + (bias[:, None] if self.branches else bias)
    return y


class SwiGLU(nn.Module):
  """w2(silu(w1 x) * w3 x), no biases; Linear (kernel_size 1, MMAudio MLP) or conv (ConvMLP)."""
  hidden_dim: int
  kernel_size: int = 1
  branches: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: str = 'default'

  def _proj(self, name, features, in_name, out_name):
    common = dict(branches=self.branches, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision, use_bias=False, name=name)
    if self.kernel_size == 1:
      return Dense((features,), in_name, (out_name,), **common)
    return Conv1d(features, self.kernel_size, in_name, out_name, **common)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dim = x.shape[-1]
    h = nn.silu(self._proj('w1', self.hidden_dim, 'embed', 'mlp')(x))
    h = h * self._proj('w3', self.hidden_dim, 'embed', 'mlp')(x)
    return self._proj('w2', dim, 'mlp', 'embed')(h)


def layer_norm(x: Array, eps: float = 1e-5) -> Array:
  """LayerNorm without affine params, biased variance, computed in >= float32."""
  xf = x.astype(norm_dtype(x.dtype))
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
  """torch.nn.RMSNorm(dim) with eps=None: eps is the machine epsilon of the compute dtype."""
  branches: int = 0
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:  # (..., [E,] L, H, Dh)
    lead = (self.branches,) if self.branches else ()
    scale = self.param('scale', partitioned(nn.initializers.ones, (('ear',) if lead else ()) + ('head_dim',)),
                       lead + (x.shape[-1],), self.param_dtype)
    ctype = norm_dtype(x.dtype)
    xf = x.astype(ctype)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + jnp.finfo(ctype).eps)
    scale = jnp.asarray(scale, ctype)
    if self.branches:
      scale = scale[:, None, None, :]  # broadcast over (L, H)
    return (y * scale).astype(x.dtype)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1 + scale) + shift


def apply_rope(x: Array, rot: Array, round_to_float32: bool = True) -> Array:
  """Rotate adjacent pairs (x[2k], x[2k+1]) of each head. x (..., L, H, Dh), rot (L, Dh/2, 2, 2).

  Like MMAudio, q/k are rounded to float32 first (`round_to_float32`; the Perception Encoder does
  not) and the rotation is computed in >= float32.
  """
  ctype = norm_dtype(x.dtype)
  xf = (x.astype(jnp.float32) if round_to_float32 else x).astype(ctype)
  xf = xf.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  r = jnp.asarray(rot).astype(ctype)[:, None]  # (L, 1, Dh/2, 2, 2)
  out0 = r[..., 0, 0] * xf[..., 0] + r[..., 0, 1] * xf[..., 1]
  out1 = r[..., 1, 0] * xf[..., 0] + r[..., 1, 1] * xf[..., 1]
  return jnp.stack([out0, out1], axis=-1).reshape(x.shape).astype(x.dtype)


def attention(q: Array, k: Array, v: Array, impl: str = 'reference', precision: str = 'default',
              bias: Array | None = None) -> Array:
  """softmax(q k^T / sqrt(Dh) + bias) v, no mask. q (B, Lq, H, Dh), k/v (B, Lk, H, Dh), optional
  logit bias (H, Lq, Lk) -> (B, Lq, H, Dh). impl 'xla' / 'cudnn' use jax.nn.dot_product_attention."""
  if impl != 'reference':
    return _fused_attention(q, k, v, impl, bias)
  ctype = norm_dtype(q.dtype)
  scale = 1.0 / np.sqrt(q.shape[-1])
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=ctype,
                      precision=PRECISIONS[precision]) * scale
  if bias is not None:
    logits = logits + bias[None].astype(ctype)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v, precision=PRECISIONS[precision])


def _fused_attention(q: Array, k: Array, v: Array, impl: str, bias: Array | None) -> Array:
  """jax.nn.dot_product_attention. cuDNN's kernel with a bias wants even lengths (e.g. the binaural
  joint attention has 2 * 345 + 64 + 77 = 831 tokens), so odd lengths get one padded query (dropped
  after) and one padded key that the bias masks out."""
  if bias is None:
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)
  lq, lk = q.shape[1], k.shape[1]
  pad_q, pad_k = lq % 2, lk % 2
  if pad_q or pad_k:
    seq = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
    q, k, v = seq(q, pad_q), seq(k, pad_k), seq(v, pad_k)
    bias = jnp.pad(bias.astype(jnp.float32), ((0, 0), (0, pad_q), (0, 0)))
    if pad_k:
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 1)), constant_values=-1e9)
  out = jax.nn.dot_product_attention(q, k, v, bias[None].astype(q.dtype), implementation=impl)
  return out[:, :lq]
