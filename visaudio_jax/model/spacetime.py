"""Conditional spacetime module (ViSAudio): where things are in the frame, per ear.

Perception Encoder spatial tokens of each frame, plus learned ear-specific position embeddings
E^L / E^R, are pooled by attention with a learned per-ear query; the pooled vector is projected to the
model width by a zero-initialised layer (so a fresh binaural model equals MMAudio on each ear). The
network upsamples the result to the latent rate and adds it to that ear's per-token condition.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax.model.config import NetworkConfig
from visaudio_jax.model.layers import Dense, layer_norm, norm_dtype, partitioned


class SpacetimeModule(nn.Module):
  cfg: NetworkConfig

  @nn.compact
  def __call__(self, pe_f: jax.Array) -> jax.Array:
    """pe_f (B, T, h, w, D_pe) -> per-ear conditions (B, E, T, D)."""
    cfg, st = self.cfg, self.cfg.spacetime
    common = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                  precision=cfg.matmul_precision)
    b, t, h, w, _ = pe_f.shape
    heads, head_dim = st.pool_heads, st.pool_dim // st.pool_heads
    tokens = Dense((st.pool_dim,), 'cond', ('embed',), name='token_proj', **common)(
        pe_f.reshape(b, t, h * w, -1))  # (B, T, S, P)
    ear_pos = self.param('ear_pos_emb', partitioned(nn.initializers.normal(0.02), ('ear', None, 'embed')),
                         (cfg.channels, h * w, st.pool_dim), common['param_dtype'])
    x = layer_norm(tokens[:, None] + jnp.asarray(ear_pos, tokens.dtype)[None, :, None])  # (B, E, T, S, P)
    k = Dense((heads, head_dim), 'embed', ('heads', 'head_dim'), use_bias=False, name='key', **common)(x)  # a key bias cannot change a softmax over keys
    v = Dense((heads, head_dim), 'embed', ('heads', 'head_dim'), name='value', **common)(x)
    query = self.param('ear_query', partitioned(nn.initializers.normal(1.0), ('ear', 'heads', 'head_dim')),
                       (cfg.channels, heads, head_dim), common['param_dtype'])
    logits = jnp.einsum('betshd,ehd->beths', k, jnp.asarray(query, k.dtype),
                        preferred_element_type=norm_dtype(k.dtype)) / np.sqrt(head_dim)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    pooled = jnp.einsum('beths,betshd->bethd', weights, v).reshape(b, cfg.channels, t, st.pool_dim)
    return Dense((cfg.hidden_dim,), 'embed', ('embed_out',), kernel_init=nn.initializers.zeros,
                 name='out_proj', **common)(pooled)
