"""The ViSAudio flow network: MMAudio's multimodal DiT with one latent branch per ear.

Flax Linen, a pure function of params. Methods (call with `model.apply(params, ..., method=...)`):
  preprocess_conditions  clip/sync/text/PE features -> Conditions, once per clip (cacheable)
  empty_conditions       the learned null conditions for classifier-free guidance
  predict_flow           velocity at (x_t, t) given Conditions, once per ODE step
  __call__               predict_flow(preprocess_conditions(...)), MMAudio's `forward`
Shapes: latent (B, E, N, C) with E = cfg.channels ears; features as `feature_shapes(cfg)` lists.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax.model.blocks import LATENT_AXES, FinalLayer, FusedBlock, JointBlock, _common
from visaudio_jax.model.config import REMAT_POLICIES, NetworkConfig
from visaudio_jax.model.layers import Conv1d, Dense, SwiGLU, norm_dtype, partitioned
from visaudio_jax.model.spacetime import SpacetimeModule
from visaudio_jax.model.tables import Tables, make_tables

Array = jax.Array
# MMAudio stores these as frozen nn.Parameters: counted, loaded and saved, never trained.
FROZEN_PARAMS = ('latent_mean', 'latent_std', 'empty_string_feat')


class Conditions(NamedTuple):
  """Projected conditions; t-independent, so computed once per clip and reused every ODE step."""
  clip_f: Array  # (B, Lc, D)
  sync_f: Array  # (B, N, D), upsampled to the latent rate
  text_f: Array  # (B, Lt, D)
  clip_f_c: Array  # (B, D)
  text_f_c: Array  # (B, D)
  pe_c: Array | None  # (B, E, N, D) per-ear spacetime condition, None without the module


def feature_shapes(cfg: NetworkConfig) -> dict[str, tuple[int, ...]]:
  """Per-example shapes of the network inputs for this config's sequence lengths."""
  lens, st = cfg.seq_lens(), cfg.spacetime
  shapes = {'latent': (cfg.channels, lens.latent, cfg.latent_dim), 'clip_f': (lens.clip, cfg.clip_dim),
            'sync_f': (lens.sync, cfg.sync_dim), 'text_f': (lens.text, cfg.text_dim)}
  if st.enabled:
    shapes['pe_f'] = (lens.pe, st.grid_h, st.grid_w, st.pe_dim)
  return shapes


def check_shape(name: str, x, expected: tuple[int, ...], batch: int):
  got, want = tuple(np.shape(x)), (batch,) + tuple(expected)
  if got != want:
    raise ValueError(f'{name}: expected shape {want} (batch, {", ".join(map(str, expected))}), got {got}')


def _remat_scan(cls, cfg: NetworkConfig, length: int, n_broadcast: int, scan: bool | None = None):
  """Apply the config's remat policy and (optionally) scan `length` identical blocks."""
  scan = cfg.scan_layers if scan is None else scan
  if cfg.remat_policy != 'none':
    cls = nn.remat(cls, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not scan)
  if not scan:
    return cls
  return nn.scan(cls, variable_axes={'params': 0}, split_rngs={'params': True},
                 in_axes=(nn.broadcast,) * n_broadcast, length=length,
                 metadata_params={nn.PARTITION_NAME: 'layers'})


def init_variables(cfg: NetworkConfig, seed: int = 0):
  """Variables (boxed with logical axis names) from zero inputs of the config's shapes: the one init
  behind fresh params (`jax.jit`), abstract shapes (`jax.eval_shape`) and sharded creation."""
  args = {k: jnp.zeros((1,) + v, jnp.dtype(cfg.param_dtype)) for k, v in feature_shapes(cfg).items()}
  latent = args.pop('latent')
  return FlowNetwork(cfg).init(jax.random.key(seed), latent, jnp.zeros((1,)), **args)


class FlowNetwork(nn.Module):
  cfg: NetworkConfig

  def setup(self):
    cfg, common = self.cfg, _common(self.cfg)
    d, e, hid = cfg.hidden_dim, cfg.per_ear_branches, cfg.mlp_hidden_dim
    lens = cfg.seq_lens()
    self._act = nn.silu if cfg.v2 else nn.selu  # input projections: SELU (v1) or SiLU (v2)
    pdt = common['param_dtype']
    param = lambda name, init, names, shape: self.param(name, partitioned(init, names), shape, pdt)
    zeros = nn.initializers.zeros
    # Learned null conditions and (frozen) latent statistics.
    self.sync_pos_emb = param('sync_pos_emb', zeros, (None, 'cond'), (8, cfg.sync_dim))
    self.empty_clip_feat = param('empty_clip_feat', zeros, ('cond',), (cfg.clip_dim,))
    self.empty_sync_feat = param('empty_sync_feat', zeros, ('cond',), (cfg.sync_dim,))
    self.empty_string_feat = param('empty_string_feat', zeros, (None, 'cond'), (lens.text, cfg.text_dim))
    self.latent_mean = param('latent_mean', zeros, ('latent',), (cfg.latent_dim,))
    self.latent_std = param('latent_std', nn.initializers.ones, ('latent',), (cfg.latent_dim,))
    # Input projections (no residual). Audio is per ear; clip/sync/text are shared.
    self.audio_in = Conv1d(d, 7, 'latent', 'embed', branches=e, name='audio_input_proj_conv', **common)
    self.audio_mlp = SwiGLU(hid, 7, branches=e, name='audio_input_proj_mlp', **common)
    self.clip_in = Dense((d,), 'cond', ('embed',), name='clip_input_proj_linear', **common)
    self.clip_mlp = SwiGLU(hid, 3, name='clip_input_proj_mlp', **common)
    self.sync_in = Conv1d(d, 7, 'cond', 'embed', name='sync_input_proj_conv', **common)
    self.sync_mlp = SwiGLU(hid, 3, name='sync_input_proj_mlp', **common)
    self.text_in = Dense((d,), 'cond', ('embed',), name='text_input_proj_linear', **common)
    self.text_mlp = SwiGLU(hid, 1, name='text_input_proj_mlp', **common)
    self.clip_cond_proj = Dense((d,), 'embed', ('embed_out',), **common)
    self.text_cond_proj = Dense((d,), 'embed', ('embed_out',), **common)
    self.global_cond_mlp = SwiGLU(hid, 1, **common)
    t_init = nn.initializers.normal(0.02)
    self.t_embed_1 = Dense((d,), 'cond', ('embed',), kernel_init=t_init, **common)
    self.t_embed_2 = Dense((d,), 'embed', ('embed_out',), kernel_init=t_init, **common)
    if cfg.branch_weights == 'shared' and cfg.channels > 1:
      self.ear_embedding = param('ear_embedding', zeros, ('ear', 'embed'), (cfg.channels, d))
    if cfg.spacetime.enabled:
      self.empty_pe_feat = param('empty_pe_feat', zeros, ('cond',), (cfg.spacetime.pe_dim,))
      self.spacetime = SpacetimeModule(cfg)
    # Blocks: N1-1 identical joint blocks, the pre_only last joint block, N2 fused blocks.
    n_joint = cfg.num_joint_blocks - 1
    if n_joint:
      joint = _remat_scan(JointBlock, cfg, n_joint, 4)
      self.joint_blocks = (joint(cfg, name='joint_blocks') if cfg.scan_layers else
                           [joint(cfg, name=f'joint_blocks_{i}') for i in range(n_joint)])
    self.last_joint_block = _remat_scan(JointBlock, cfg, 1, 4, scan=False)(
        cfg, pre_only=True, name='last_joint_block')
    if cfg.fused_depth:
      fused = _remat_scan(FusedBlock, cfg, cfg.fused_depth, 2)
      self.fused_blocks = (fused(cfg, name='fused_blocks') if cfg.scan_layers else
                           [fused(cfg, name=f'fused_blocks_{i}') for i in range(cfg.fused_depth)])
    self.final_layer = FinalLayer(cfg)

  # ---- conditions -------------------------------------------------------------------------------

  def _tables(self, tables: Tables | None) -> Tables:
    return make_tables(self.cfg) if tables is None else tables

  def _project_text(self, text_f: Array) -> Array:
    text = self.text_in(text_f)
    return self.text_mlp(nn.silu(text) if self.cfg.v2 else text)

  def preprocess_conditions(self, clip_f, sync_f, text_f, pe_f=None, tables: Tables | None = None
                            ) -> Conditions:
    """clip_f (B, Lc, clip_dim), sync_f (B, S, sync_dim), text_f (B, Lt, text_dim),
    pe_f (B, T_pe, h, w, pe_dim) when the spacetime module is on."""
    cfg, shapes = self.cfg, feature_shapes(self.cfg)
    b = np.shape(clip_f)[0]
    for name, x in (('clip_f', clip_f), ('sync_f', sync_f), ('text_f', text_f)):
      check_shape(name, x, shapes[name], b)
    if cfg.spacetime.enabled:
      if pe_f is None:
        raise ValueError('pe_f: the spacetime module is enabled, so Perception Encoder features '
                         f'of shape (batch, {", ".join(map(str, shapes["pe_f"]))}) are required')
      check_shape('pe_f', pe_f, shapes['pe_f'], b)
    tables = self._tables(tables)
    dtype = jnp.dtype(cfg.dtype)
    s = sync_f.shape[1]
    sync_f = (sync_f.reshape(b, s // 8, 8, -1) + self.sync_pos_emb.astype(sync_f.dtype)).reshape(b, s, -1)
    clip = self.clip_in(clip_f)
    clip = self.clip_mlp(nn.silu(clip) if cfg.v2 else clip)
    sync = self.sync_mlp(self._act(self.sync_in(sync_f)))
    text = self._project_text(text_f)
    sync = jnp.take(sync, jnp.asarray(tables.sync_index), axis=1)  # nearest-exact S -> N
    pe_c = None
    if cfg.spacetime.enabled:
      pe_c = jnp.take(self.spacetime(pe_f), jnp.asarray(tables.pe_index), axis=2)  # (B, E, N, D)
    return Conditions(clip_f=clip, sync_f=sync, text_f=text,
                      clip_f_c=self.clip_cond_proj(clip.mean(1)), text_f_c=self.text_cond_proj(text.mean(1)),
                      pe_c=None if pe_c is None else pe_c.astype(dtype))

  def empty_features(self, batch: int = 1) -> dict[str, Array]:
    """The null features MMAudio feeds the unconditional branch, before any projection."""
    lens = self.cfg.seq_lens()
    out = {'clip_f': jnp.broadcast_to(self.empty_clip_feat, (batch, lens.clip, self.cfg.clip_dim)),
           'sync_f': jnp.broadcast_to(self.empty_sync_feat, (batch, lens.sync, self.cfg.sync_dim)),
           'text_f': jnp.broadcast_to(self.empty_string_feat, (batch,) + self.empty_string_feat.shape)}
    if self.cfg.spacetime.enabled:
      st = self.cfg.spacetime
      out['pe_f'] = jnp.broadcast_to(self.empty_pe_feat, (batch, lens.pe, st.grid_h, st.grid_w, st.pe_dim))
    return out

  def empty_conditions(self, batch: int, negative_text_f=None, tables: Tables | None = None) -> Conditions:
    """MMAudio's get_empty_conditions: computed at batch 1 and broadcast; negative text per sample."""
    empty = self.empty_features(1)
    cond = self.preprocess_conditions(**empty, tables=tables)
    cond = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:]), cond)
    if negative_text_f is not None:
      check_shape('negative_text_f', negative_text_f, feature_shapes(self.cfg)['text_f'], batch)
      text = self._project_text(negative_text_f)
      cond = cond._replace(text_f=text, text_f_c=self.text_cond_proj(text.mean(1)))
    return cond

  def drop_conditions(self, drop_video: Array, drop_text: Array, clip_f, sync_f, text_f, pe_f=None):
    """Per-sample CFG dropout (no Python branching): drop_video (B,) bool replaces clip, sync and PE
    together with the learned null features; drop_text (B,) bool replaces text with the empty string."""
    b = clip_f.shape[0]
    empty = self.empty_features(b)
    sel = lambda m, null, x: jnp.where(m.reshape((b,) + (1,) * (x.ndim - 1)), null.astype(x.dtype), x)
    out = {'clip_f': sel(drop_video, empty['clip_f'], clip_f), 'sync_f': sel(drop_video, empty['sync_f'], sync_f),
           'text_f': sel(drop_text, empty['text_f'], text_f)}
    if self.cfg.spacetime.enabled:
      out['pe_f'] = sel(drop_video, empty['pe_f'], pe_f)
    return out

  # ---- flow -------------------------------------------------------------------------------------

  def timestep_embedding(self, t: Array, tables: Tables | None = None) -> tuple[Array, Array]:
    """(sinusoid [cos | sin], embedding). t is rounded to float32 before the product, as MMAudio."""
    freqs = jnp.asarray(self._tables(tables).t_freqs)
    ctype = norm_dtype(t.dtype)
    args = t.astype(jnp.float32).astype(ctype)[:, None] * freqs.astype(ctype)[None]
    freq = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1).astype(t.dtype)
    return freq, self.t_embed_2(nn.silu(self.t_embed_1(freq)))

  def predict_flow(self, latent: Array, t: Array, cond: Conditions, tables: Tables | None = None) -> Array:
    """latent (B, E, N, C), t (B,) -> velocity (B, E, N, C)."""
    cfg = self.cfg
    b = latent.shape[0]
    check_shape('latent', latent, feature_shapes(cfg)['latent'], b)
    check_shape('t', t, (), b)
    tables = self._tables(tables)
    x = self.audio_mlp(self._act(self.audio_in(latent)))  # (B, E, N, D)
    g = self.global_cond_mlp(cond.clip_f_c + cond.text_f_c)
    global_c = (self.timestep_embedding(t, tables)[1] + g)[:, None]  # (B, 1, D)
    extended_c = (global_c + cond.sync_f)[:, None]  # (B, 1, N, D)
    if cond.pe_c is not None:
      extended_c = extended_c + cond.pe_c  # per-ear spacetime condition
    if cfg.branch_weights == 'shared' and cfg.channels > 1:
      extended_c = extended_c + self.ear_embedding[:, None].astype(extended_c.dtype)
    extended_c = jnp.broadcast_to(extended_c, x.shape)
    x = nn.with_logical_constraint(x, LATENT_AXES)
    carry = (x, cond.clip_f, cond.text_f)
    rots = (jnp.asarray(tables.latent_rot), jnp.asarray(tables.clip_rot))
    if cfg.num_joint_blocks > 1:
      if cfg.scan_layers:
        carry, _ = self.joint_blocks(carry, global_c, extended_c, *rots)
      else:
        for block in self.joint_blocks:
          carry, _ = block(carry, global_c, extended_c, *rots)
    (x, _, _), _ = self.last_joint_block(carry, global_c, extended_c, *rots)
    if cfg.fused_depth:
      if cfg.scan_layers:
        x, _ = self.fused_blocks(x, extended_c, rots[0])
      else:
        for block in self.fused_blocks:
          x, _ = block(x, extended_c, rots[0])
    return self.final_layer(x, global_c)

  def __call__(self, latent, t, clip_f, sync_f, text_f, pe_f=None, tables: Tables | None = None):
    return self.predict_flow(latent, t, self.preprocess_conditions(clip_f, sync_f, text_f, pe_f, tables),
                             tables)

  def normalize(self, x: Array) -> Array:
    return (x - self.latent_mean.astype(x.dtype)) / self.latent_std.astype(x.dtype)

  def unnormalize(self, x: Array) -> Array:
    return x * self.latent_std.astype(x.dtype) + self.latent_mean.astype(x.dtype)
