"""Transformer blocks: MMAudio's adaLN single block, the joint (multi-stream) block, the final layer.

Token streams: latent (B, E, N, D) with one branch per ear, clip (B, Lc, D) and text (B, Lt, D)
shared by both ears. With E = 1 every block is exactly MMAudio's.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax.model.config import NetworkConfig
from visaudio_jax.model.layers import (Conv1d, Dense, RMSNorm, SwiGLU, apply_rope, attention,
                                       layer_norm, modulate)

Array = jax.Array
LATENT_AXES = ('activation_batch', 'activation_ear', 'activation_length', 'activation_embed')
STREAM_AXES = ('activation_batch', 'activation_length', 'activation_embed')
HEAD_AXES = ('activation_batch', 'activation_length', 'activation_heads', None)


def _common(cfg: NetworkConfig) -> dict:
  return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
              precision=cfg.matmul_precision)


class SingleBlock(nn.Module):
  """MMDitSingleBlock: adaLN-modulated attention + SwiGLU, gates as plain multipliers.

  `kernel_size` 3 makes the attention output projection and the MLP convolutions (latent and clip
  streams, fused blocks); 1 makes them Linear (text stream). `pre_only` blocks only produce q/k/v.
  """
  cfg: NetworkConfig
  kernel_size: int
  pre_only: bool = False
  branches: int = 0

  def setup(self):
    cfg, common = self.cfg, _common(self.cfg)
    d, h, dh = cfg.hidden_dim, cfg.num_heads, cfg.head_dim
    self.ada_ln = Dense(((2 if self.pre_only else 6) * d,), 'embed', ('modulation',), branches=self.branches,
                        kernel_init=nn.initializers.zeros, **common)
    self.qkv = Dense((3, h, dh), 'embed', ('qkv', 'heads', 'head_dim'), branches=self.branches, **common)
    self.q_norm = RMSNorm(self.branches, common['param_dtype'])
    self.k_norm = RMSNorm(self.branches, common['param_dtype'])
    if not self.pre_only:
      if self.kernel_size > 1:
        self.linear1 = Conv1d(d, self.kernel_size, 'heads_merged', 'embed', branches=self.branches, **common)
      else:
        self.linear1 = Dense((d,), 'heads_merged', ('embed',), branches=self.branches, **common)
      self.ffn = SwiGLU(cfg.mlp_hidden_dim, self.kernel_size, branches=self.branches, **common)

  def pre_attention(self, x: Array, c: Array, rot: Array | None):
    """x (..., L, D), condition c broadcastable to it -> q, k, v (..., L, H, Dh) and the modulation."""
    mod = jnp.split(self.ada_ln(nn.silu(c)), 2 if self.pre_only else 6, axis=-1)
    h = modulate(layer_norm(x), mod[0], mod[1])
    qkv = self.qkv(h)  # (..., L, 3, H, Dh)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    q, k = self.q_norm(q), self.k_norm(k)
    if rot is not None:
      q, k = apply_rope(q, rot), apply_rope(k, rot)
    return q, k, v, mod

  def post_attention(self, x: Array, attn_out: Array, mod) -> Array:
    """attn_out (..., L, D) with heads merged head-major."""
    if self.pre_only:
      return x
    _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
    x = x + self.linear1(attn_out) * gate_msa
    return x + self.ffn(modulate(layer_norm(x), shift_mlp, scale_mlp)) * gate_mlp


def _merge_heads(x: Array) -> Array:
  return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


class JointBlock(nn.Module):
  """Latent (per ear), clip and text streams attending jointly.

  'concat': one attention over [latent_L | latent_R | clip | text]; L and R share temporal RoPE
  positions, so each ear sees the other at the same instant. A learned per-head logit bias on latent
  keys (same ear / other ear / from clip-text queries), initialised to -log E, makes the E copies of a
  key count once: a binaural model copied from MMAudio reproduces it exactly when the ears are equal.
  'sequential': ear e attends over [latent_e | clip | text], then the clip/text streams are updated
  before the next ear (so it does not reduce to MMAudio at initialisation).
  Scan-compatible: (carry, *broadcast) -> (carry, None).
  """
  cfg: NetworkConfig
  pre_only: bool = False

  def setup(self):
    cfg = self.cfg
    self.latent_block = SingleBlock(cfg, 3, branches=cfg.per_ear_branches)
    self.clip_block = SingleBlock(cfg, 3, self.pre_only)
    self.text_block = SingleBlock(cfg, 1, self.pre_only)
    if cfg.joint_mode == 'concat' and cfg.channels > 1:
      init = nn.initializers.constant(-np.log(cfg.channels))
      self.ear_logit_bias = self.param('ear_logit_bias', nn.with_logical_partitioning(init, (None, 'heads')),
                                       (3, cfg.num_heads), jnp.dtype(cfg.param_dtype))

  def _ear_bias(self, e: int, n: int, n_streams: int) -> Array:
    """(H, Q, K) logit bias for [latent ear 0 .. ear E-1 | clip | text] x the same keys."""
    group = np.concatenate([np.repeat(np.arange(e), n), np.full(n_streams, -1)])
    q, k = group[:, None], group[None, :]
    kind = np.where(k < 0, 3, np.where(q < 0, 2, np.where(q == k, 0, 1)))  # self, cross, stream, none
    table = jnp.concatenate([self.ear_logit_bias, jnp.zeros((1, self.cfg.num_heads), self.ear_logit_bias.dtype)])
    return jnp.moveaxis(table[kind], -1, 0)

  def __call__(self, carry, global_c, extended_c, latent_rot, clip_rot):
    latent, clip, text = carry  # (B, E, N, D), (B, Lc, D), (B, Lt, D)
    b, e, n, _ = latent.shape
    lc = clip.shape[1]
    attn = lambda q, k, v, bias=None: attention(q, k, v, self.cfg.attention_impl, self.cfg.matmul_precision, bias)
    lq, lk, lv, lmod = self.latent_block.pre_attention(latent, extended_c, latent_rot)  # (B,E,N,H,Dh)

    def streams_qkv(clip, text):
      cq, ck, cv, cmod = self.clip_block.pre_attention(clip, global_c, clip_rot)
      tq, tk, tv, tmod = self.text_block.pre_attention(text, global_c, None)
      return (cq, ck, cv), (tq, tk, tv), cmod, tmod

    def post_streams(out, clip, text, cmod, tmod):
      start = out.shape[1] - lc - text.shape[1]  # streams follow the latent tokens
      clip_out, text_out = jnp.split(out[:, start:], [lc], axis=1)
      clip = self.clip_block.post_attention(clip, _merge_heads(clip_out), cmod)
      text = self.text_block.post_attention(text, _merge_heads(text_out), tmod)
      return clip, text

    if self.cfg.joint_mode == 'concat':
      c_qkv, t_qkv, cmod, tmod = streams_qkv(clip, text)
      flat = lambda x: x.reshape((b, e * n) + x.shape[3:])
      q, k, v = (nn.with_logical_constraint(jnp.concatenate([flat(l), c, t], axis=1), HEAD_AXES)
                 for l, c, t in zip((lq, lk, lv), c_qkv, t_qkv))
      bias = self._ear_bias(e, n, q.shape[1] - e * n) if e > 1 else None
      out = attn(q, k, v, bias)  # (B, E*N + Lc + Lt, H, Dh)
      latent_out = out[:, :e * n].reshape((b, e, n) + out.shape[2:])
      clip, text = post_streams(out, clip, text, cmod, tmod)
    else:
      latent_outs = []
      for ear in range(e):
        c_qkv, t_qkv, cmod, tmod = streams_qkv(clip, text)
        q, k, v = (nn.with_logical_constraint(jnp.concatenate([l[:, ear], c, t], axis=1), HEAD_AXES)
                   for l, c, t in zip((lq, lk, lv), c_qkv, t_qkv))
        out = attn(q, k, v)
        latent_outs.append(out[:, :n])
        clip, text = post_streams(out, clip, text, cmod, tmod)
      latent_out = jnp.stack(latent_outs, axis=1)
    latent = self.latent_block.post_attention(latent, _merge_heads(latent_out), lmod)
    latent = nn.with_logical_constraint(latent, LATENT_AXES)
    clip = nn.with_logical_constraint(clip, STREAM_AXES)
    text = nn.with_logical_constraint(text, STREAM_AXES)
    return (latent, clip, text), None


class FusedBlock(nn.Module):
  """Single-stream block on each ear's latent tokens. Scan-compatible: (x, c, rot) -> (x, None)."""
  cfg: NetworkConfig

  @nn.compact
  def __call__(self, x, extended_c, latent_rot):
    block = SingleBlock(self.cfg, 3, branches=self.cfg.per_ear_branches, name='block')
    q, k, v, mod = block.pre_attention(x, extended_c, latent_rot)  # (B, E, N, H, Dh)
    b, e = q.shape[:2]
    fold = lambda t: t.reshape((b * e,) + t.shape[2:])  # ears attend separately
    out = attention(fold(q), fold(k), fold(v), self.cfg.attention_impl, self.cfg.matmul_precision)
    x = block.post_attention(x, _merge_heads(out.reshape(q.shape)), mod)
    return nn.with_logical_constraint(x, LATENT_AXES), None


class FinalLayer(nn.Module):
  """LayerNorm + adaLN(global_c) + conv(k=7) to latent channels. MMAudio conditions it on global_c,
  not extended_c (its issue #55); we keep that for checkpoint compatibility."""
  cfg: NetworkConfig

  @nn.compact
  def __call__(self, x: Array, global_c: Array) -> Array:  # (B, E, N, D), (B, 1, D)
    cfg, common = self.cfg, _common(self.cfg)
    branches = cfg.per_ear_branches
    c = jnp.broadcast_to(global_c[:, None], (x.shape[0], x.shape[1], 1, x.shape[-1]))
    shift, scale = jnp.split(Dense((2 * cfg.hidden_dim,), 'embed', ('modulation',), branches=branches,
                                   kernel_init=nn.initializers.zeros, name='ada_ln', **common)(nn.silu(c)),
                             2, axis=-1)
    h = modulate(layer_norm(x), shift, scale)
    return Conv1d(cfg.latent_dim, 7, 'embed', 'latent', branches=branches, zero_init=True,
                  name='conv', **common)(h)
