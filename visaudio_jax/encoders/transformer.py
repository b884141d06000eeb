"""The pre-norm transformer block shared by the CLIP and Perception Encoder towers.

Both are open_clip-style `ResidualAttentionBlock`s with torch `nn.MultiheadAttention` weights:
x += ls_1 * attn(ln_1(x)); x += ls_2 * mlp(ln_2(x)), mlp = c_fc -> activation -> c_proj. Param
names mirror the torch keys through `convert.state_dict.module_path` and `flax_leaf`:
`transformer.resblocks.3.attn.in_proj_weight` -> transformer/resblocks_3/attn/in_proj/kernel (in, 3W);
LayerNorm `weight` -> `scale`. Activations are (B, N, W); LayerNorms and softmax run in >= float32.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from visaudio_jax.model.layers import PRECISIONS, apply_rope, attention, norm_dtype

Array = jax.Array


def quick_gelu(x: Array) -> Array:
  """OpenAI CLIP's x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: Array) -> Array:
  """Exact (erf) GELU, torch's nn.GELU() default."""
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {'quick_gelu': quick_gelu, 'gelu': gelu}


def layer_norm(x: Array, epsilon: float, name: str) -> Array:
  """torch LayerNorm (affine; `weight` -> `scale`) in at least float32, returned in x's dtype. Call
  it inside a compact method: the LayerNorm becomes the caller's submodule `name`."""
  ln = nn.LayerNorm(epsilon=epsilon, dtype=norm_dtype(x.dtype), param_dtype=jnp.float32, name=name)
  return ln(x).astype(x.dtype)


def dense(features: int, name: str, dtype: Any = None, precision: str = 'highest', use_bias: bool = True):
  """torch Linear as nn.Dense: kernel (in, out) = weight.T; float32 params, compute in `dtype`."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  precision=PRECISIONS[precision], name=name)


class MultiheadAttention(nn.Module):
  """torch nn.MultiheadAttention (batch_first): packed in_proj rows [q; k; v], heads contiguous,
  scale head_dim^-0.5. `bias`: additive logits (H or 1, N, N), e.g. a causal mask; `rot`: adjacent-
  pair RoPE rotations (N, head_dim / 2, 2, 2) applied to q and k of every head."""
  num_heads: int
  dtype: Any = None
  precision: str = 'highest'
  attention_impl: str = 'reference'

  @nn.compact
  def __call__(self, x: Array, bias: Array | None = None, rot: Array | None = None) -> Array:
    b, n, w = x.shape
    h = self.num_heads
    kw = dict(dtype=self.dtype, precision=self.precision)
    qkv = dense(3 * w, 'in_proj', **kw)(x).reshape(b, n, 3, h, w // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, Dh) each
    if rot is not None:
      q, k = apply_rope(q, rot, round_to_float32=False), apply_rope(k, rot, round_to_float32=False)
    if bias is not None:
      bias = jnp.broadcast_to(bias, (h,) + bias.shape[-2:])
    out = attention(q, k, v, self.attention_impl, self.precision, bias)  # (B, N, H, Dh)
    return dense(w, 'out_proj', **kw)(out.reshape(b, n, w))


class LayerScale(nn.Module):
  @nn.compact
  def __call__(self, x: Array) -> Array:
    return x * self.param('gamma', nn.initializers.constant(0.1), (x.shape[-1],), jnp.float32).astype(x.dtype)


class MLP(nn.Module):
  hidden: int
  activation: str
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    width = x.shape[-1]
    x = ACTIVATIONS[self.activation](dense(self.hidden, 'c_fc', **kw)(x))
    return dense(width, 'c_proj', **kw)(x)


class ResidualAttentionBlock(nn.Module):
  """open_clip / Perception Encoder block (pre-norm, optional LayerScale)."""
  num_heads: int
  mlp_width: int
  activation: str = 'gelu'
  epsilon: float = 1e-5
  layer_scale: bool = False
  dtype: Any = None
  precision: str = 'highest'
  attention_impl: str = 'reference'

  @nn.compact
  def __call__(self, x: Array, bias: Array | None = None, rot: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    h = MultiheadAttention(self.num_heads, attention_impl=self.attention_impl, name='attn', **kw)(
        layer_norm(x, self.epsilon, 'ln_1'), bias, rot)
    x = x + (LayerScale(name='ls_1')(h) if self.layer_scale else h)
    h = MLP(self.mlp_width, self.activation, name='mlp', **kw)(layer_norm(x, self.epsilon, 'ln_2'))
    return x + (LayerScale(name='ls_2')(h) if self.layer_scale else h)


class Transformer(nn.Module):
  """`transformer.resblocks.{i}`: a stack of ResidualAttentionBlocks."""
  layers: int
  num_heads: int
  mlp_width: int
  activation: str = 'gelu'
  epsilon: float = 1e-5
  layer_scale: bool = False
  dtype: Any = None
  precision: str = 'highest'
  attention_impl: str = 'reference'

  @nn.compact
  def __call__(self, x: Array, bias: Array | None = None, rot: Array | None = None) -> Array:
    for i in range(self.layers):
      x = ResidualAttentionBlock(self.num_heads, self.mlp_width, self.activation, self.epsilon,
                                 self.layer_scale, self.dtype, self.precision, self.attention_impl,
                                 name=f'resblocks_{i}')(x, bias, rot)
    return x
