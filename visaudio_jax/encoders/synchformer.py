"""Synchformer's visual branch as MMAudio uses it, in Flax: the source of MMAudio's `sync_f`.

`mmaudio/ext/synchformer`: a MotionFormer "divided_224_16x4" (tubelet Conv3d patch embedding, CLS
token, separate spatial/temporal position embeddings, divided space-time blocks) whose patch tokens
are pooled per frame by a spatial `nn.TransformerEncoderLayer` with its own CLS token; the temporal
aggregator is Identity. One 16-frame segment -> 8 vectors. MMAudio cuts a 25 fps clip into 16-frame
segments with stride 8 (`FeaturesUtils.encode_video_with_sync`); `encode_video` does the same.

Params mirror the torch keys of `Synchformer.vfeat_extractor` *without* the `vfeat_extractor.`
prefix (`convert.synchformer` adds and strips it), through `convert.state_dict.module_path` and
`flax_leaf`: `blocks.3.timeattn.qkv.weight` -> blocks_3/timeattn/qkv/kernel (D, 3D);
`spatial_attn_agg.self_attn.in_proj_weight` -> spatial_attn_agg/self_attn/in_proj/kernel;
Conv3d (out, in, t, h, w) -> kernel (t, h, w, in, out). The checkpoint's 2D `patch_embed.proj` is
unused in forward; it is kept as a param (created, never read) so the key set and the parameter
count (122,440,704) round-trip. Frames are channels-last: segments (N, 16, H, W, 3) in [-1, 1].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax.encoders.transformer import MultiheadAttention, dense, gelu, layer_norm
from visaudio_jax.model.layers import PRECISIONS, norm_dtype

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SynchformerConfig:
  """MotionFormer hyper-parameters. The 2D `patch_embed` only fixes pos_embed's length (1 + npatch),
  which must equal the tubelet grid (img_size // patch_size)^2, so it needs no field of its own."""
  img_size: int = 224  # input frames are img_size x img_size (MMAudio: resize + center crop 224)
  patch_size: int = 16
  temporal_patch: int = 2  # tubelet depth (PATCH_SIZE_TEMP)
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12  # the blocks' and the spatial aggregator's
  mlp_ratio: float = 4
  frames_per_segment: int = 16
  segment_stride: int = 8
  in_chans: int = 3
  epsilon: float = 1e-6  # every LayerNorm

  def __post_init__(self):
    if self.img_size % self.patch_size or self.frames_per_segment % self.temporal_patch:
      raise ValueError(f'{self}: img_size must be a multiple of patch_size and frames_per_segment '
                       f'of temporal_patch')
    if self.embed_dim % self.num_heads:
      raise ValueError(f'{self}: embed_dim must be a multiple of num_heads')

  @property
  def grid(self) -> int:  # patches per side
    return self.img_size // self.patch_size

  @property
  def num_patches(self) -> int:  # per frame (npatch)
    return self.grid ** 2

  @property
  def temporal_resolution(self) -> int:  # output vectors per segment
    return self.frames_per_segment // self.temporal_patch

  @property
  def mlp_hidden(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)

  def num_segments(self, num_frames: int) -> int:
    """MMAudio's S = (T - 16) // 8 + 1; trailing frames that do not fill a segment are dropped."""
    if num_frames < self.frames_per_segment:
      raise ValueError(f'Synchformer needs at least {self.frames_per_segment} frames (one segment; '
                       f'{self.frames_per_segment / 25:.2f} s at 25 fps), got {num_frames}')
    return (num_frames - self.frames_per_segment) // self.segment_stride + 1


SYNCHFORMER = SynchformerConfig()
# A seeded CPU demo: 2x2 patches of 32 px, same segmenting and 8 outputs per segment.
TINY_SYNCHFORMER = SynchformerConfig(img_size=32, embed_dim=48, depth=2, num_heads=2)
SYNCHFORMER_PRESETS = {'synchformer': SYNCHFORMER, 'tiny_synchformer': TINY_SYNCHFORMER}

_EMBED_INIT = nn.initializers.truncated_normal(0.02)  # MotionFormer's trunc_normal_(std=.02)


def _attend(q: Array, k: Array, v: Array, precision: str) -> Array:
  """softmax(q k^T) v for pre-scaled q (MotionFormer's `qkv_attn`), batched over leading axes.
  q (..., Mq, H, Dh), k/v (..., Mk, H, Dh) -> (..., Mq, H, Dh); logits/softmax in >= float32."""
  prec = PRECISIONS[precision]
  logits = jnp.einsum('...qhd,...khd->...hqk', q, k, preferred_element_type=norm_dtype(q.dtype), precision=prec)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('...hqk,...khd->...qhd', weights, v, precision=prec)


class DividedAttention(nn.Module):
  """MotionFormer `DividedAttention`: one `qkv` Linear ([q | k | v], heads contiguous), q scaled by
  head_dim^-0.5 before q.k, no mask. The CLS query attends to every token; a patch query (f, n)
  attends to CLS plus the patches that share its n ('time') or its f ('space')."""
  num_heads: int
  axis: str  # 'time' | 'space'
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array, frames: int) -> Array:  # (N, 1 + F*P, D)
    n, length, d = x.shape
    h, p = self.num_heads, (length - 1) // frames
    kw = dict(dtype=self.dtype, precision=self.precision)
    qkv = dense(3 * d, 'qkv', **kw)(x).reshape(n, length, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (N, L, H, Dh)
    q = q * jnp.asarray((d // h) ** -0.5, q.dtype)
    cls_out = _attend(q[:, :1], k, v, self.precision)  # (N, 1, H, Dh)

    def groups(t):  # patch tokens -> (N, G, M, H, Dh): attention runs along M within each group
      t = t[:, 1:].reshape(n, frames, p, h, d // h)
      return t if self.axis == 'space' else t.swapaxes(1, 2)

    def with_cls(t, g):  # [CLS, the group's patches] as keys / values
      cls = jnp.broadcast_to(t[:, None, :1], (n, g.shape[1], 1) + t.shape[2:])
      return jnp.concatenate([cls, g], axis=2)

    qg, kg, vg = groups(q), groups(k), groups(v)
    out = _attend(qg, with_cls(k, kg), with_cls(v, vg), self.precision)  # (N, G, M, H, Dh)
    if self.axis == 'time':
      out = out.swapaxes(1, 2)
    out = jnp.concatenate([cls_out, out.reshape(n, frames * p, h, d // h)], axis=1)
    return dense(d, 'proj', **kw)(out.reshape(n, length, d))


class Mlp(nn.Module):
  hidden: int
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    return dense(x.shape[-1], 'fc2', **kw)(gelu(dense(self.hidden, 'fc1', **kw)(x)))


class DividedSpaceTimeBlock(nn.Module):
  """Pre-norm: x += timeattn(norm3 x); x += attn(norm1 x); x += mlp(norm2 x)."""
  config: SynchformerConfig
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, kw = self.config, dict(dtype=self.dtype, precision=self.precision)
    frames = cfg.temporal_resolution
    h = DividedAttention(cfg.num_heads, 'time', name='timeattn', **kw)(layer_norm(x, cfg.epsilon, 'norm3'), frames)
    self.sow('intermediates', 'timeattn_out', h)
    x = x + h
    h = DividedAttention(cfg.num_heads, 'space', name='attn', **kw)(layer_norm(x, cfg.epsilon, 'norm1'), frames)
    self.sow('intermediates', 'attn_out', h)
    x = x + h
    x = x + Mlp(cfg.mlp_hidden, name='mlp', **kw)(layer_norm(x, cfg.epsilon, 'norm2'))
    self.sow('intermediates', 'out', x)
    return x


class PatchEmbed3D(nn.Module):
  """Tubelet Conv3d with kernel = stride = (2, 16, 16) as a patchify matmul. (N, T, H, W, C) ->
  (N, t*h*w, D), token order (t, h, w): t slowest, row-major in space."""
  config: SynchformerConfig
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    pt, p, c, d = cfg.temporal_patch, cfg.patch_size, cfg.in_chans, cfg.embed_dim
    kernel = self.param('kernel', nn.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4), (pt, p, p, c, d))
    bias = self.param('bias', nn.initializers.zeros, (d,))
    dtype = self.dtype or jnp.result_type(x, kernel)
    n, t, hh, ww, _ = x.shape
    x = x.astype(dtype).reshape(n, t // pt, pt, hh // p, p, ww // p, p, c)
    y = jnp.einsum('nTaHbWcC,abcCD->nTHWD', x, kernel.astype(dtype), precision=PRECISIONS[self.precision])
    return (y + bias.astype(dtype)).reshape(n, -1, d)


class _UnusedConv2d(nn.Module):
  """The checkpoint's 2D `patch_embed.proj` (Conv2d 16x16): created so it loads, never applied."""
  config: SynchformerConfig

  @nn.compact
  def __call__(self) -> None:
    cfg = self.config
    self.param('kernel', nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
               (cfg.patch_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim))
    self.param('bias', nn.initializers.zeros, (cfg.embed_dim,))


class _PatchEmbed2D(nn.Module):
  config: SynchformerConfig

  @nn.compact
  def __call__(self) -> None:
    _UnusedConv2d(self.config, name='proj')()


class _TubeletEmbed(nn.Module):
  config: SynchformerConfig
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return PatchEmbed3D(self.config, self.dtype, self.precision, name='proj')(x)


class SpatialTransformerEncoderLayer(nn.Module):
  """torch nn.TransformerEncoderLayer(norm_first=True, GELU, batch_first) with its own `cls_token`,
  run on [cls, the h*w tokens of one frame] for every (segment, frame); returns the CLS position."""
  num_heads: int
  hidden: int
  epsilon: float = 1e-6
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x: Array) -> Array:  # (N, t, P, D) -> (N, t, D)
    n, t, p, d = x.shape
    kw = dict(dtype=self.dtype, precision=self.precision)
    cls = self.param('cls_token', nn.initializers.zeros, (1, 1, d))
    x = x.reshape(n * t, p, d)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n * t, 1, d)), x], axis=1)
    x = x + MultiheadAttention(self.num_heads, name='self_attn', **kw)(layer_norm(x, self.epsilon, 'norm1'))
    h = gelu(dense(self.hidden, 'linear1', **kw)(layer_norm(x, self.epsilon, 'norm2')))
    x = x + dense(d, 'linear2', **kw)(h)
    return x[:, 0].reshape(n, t, d)


class MotionFormer(nn.Module):
  """`Synchformer.vfeat_extractor` for one segment per row: (N, 16, H, W, 3) in [-1, 1] -> (N, 8, D).

  `dtype`: compute dtype; None follows inputs and params (float64 in x64 runs). LayerNorms and
  softmax run in >= float32. Intermediates are sown under 'intermediates' with the fixture's names.
  """
  config: SynchformerConfig
  dtype: Any = None
  precision: str = 'highest'

  @nn.compact
  def __call__(self, segments: Array) -> Array:
    cfg, kw = self.config, dict(dtype=self.dtype, precision=self.precision)
    want = (cfg.frames_per_segment, cfg.img_size, cfg.img_size, cfg.in_chans)
    if segments.ndim != 5 or segments.shape[1:] != want:
      raise ValueError(f'MotionFormer: expected segments (N, {", ".join(map(str, want))}) channels-last, '
                       f'got shape {segments.shape}')
    if self.dtype is not None:
      segments = segments.astype(self.dtype)
    d, t, p = cfg.embed_dim, cfg.temporal_resolution, cfg.num_patches
    cls_token = self.param('cls_token', _EMBED_INIT, (1, 1, d))
    pos_embed = self.param('pos_embed', _EMBED_INIT, (1, 1 + p, d))
    temp_embed = self.param('temp_embed', _EMBED_INIT, (1, t, d))
    _PatchEmbed2D(cfg, name='patch_embed')()

    x = _TubeletEmbed(cfg, name='patch_embed_3d', **kw)(segments)  # (N, t*P, D)
    self.sow('intermediates', 'patch_embed_3d_out', x)
    n = x.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (n, 1, d)), x], axis=1)
    # "separate" position embedding: CLS gets pos_embed[0]; patch (f, n) pos_embed[1 + n] + temp_embed[f]
    patches = (pos_embed[:, None, 1:] + temp_embed[:, :, None]).reshape(1, t * p, d)
    x = x + jnp.concatenate([pos_embed[:, :1], patches], axis=1).astype(x.dtype)
    self.sow('intermediates', 'tokens_before_blocks', x)
    for i in range(cfg.depth):
      x = DividedSpaceTimeBlock(cfg, name=f'blocks_{i}', **kw)(x)
    x = layer_norm(x[:, 1:], cfg.epsilon, 'norm')  # CLS dropped first
    self.sow('intermediates', 'norm_out', x)
    x = SpatialTransformerEncoderLayer(cfg.num_heads, cfg.mlp_hidden, cfg.epsilon, name='spatial_attn_agg',
                                       **kw)(x.reshape(n, t, p, d))
    self.sow('intermediates', 'spatial_attn_agg_out', x)
    return x  # temp_attn_agg is Identity


@functools.partial(jax.jit, static_argnums=0)
def _init(config: SynchformerConfig, key: Array) -> dict:
  segments = jnp.zeros((1, config.frames_per_segment, config.img_size, config.img_size, config.in_chans), jnp.float32)
  return MotionFormer(config).init(key, segments)['params']


def init_synchformer(config: SynchformerConfig, seed: int = 0) -> dict:
  """Seeded random float32 params (full size: use jax.eval_shape for shapes only)."""
  return _init(config, jax.random.key(seed))


def normalize_frames(frames: Array, dtype: Any = jnp.float32) -> Array:
  """uint8 RGB frames -> [-1, 1]: torchvision ToDtype(scale=True) then Normalize(0.5, 0.5)."""
  x = jnp.asarray(frames).astype(dtype) / 255
  return (x - 0.5) / 0.5


def segment_indices(config: SynchformerConfig, num_frames: int) -> np.ndarray:
  """(S, 16) frame indices of MMAudio's segments: [0..15], [8..23], ..."""
  s = config.num_segments(num_frames)
  return np.arange(s)[:, None] * config.segment_stride + np.arange(config.frames_per_segment)


def encode_segments(config: SynchformerConfig, params: dict, segments: Array, dtype: Any = None,
                    precision: str = 'highest') -> Array:
  """(N, 16, H, W, 3) in [-1, 1] -> (N, 8, D): `Synchformer(x)` for N single-segment clips."""
  return MotionFormer(config, dtype, precision).apply({'params': params}, segments)


def encode_video(config: SynchformerConfig, params: dict, video: Array, dtype: Any = None,
                 precision: str = 'highest') -> Array:
  """MMAudio's `encode_video_with_sync`: video (B, T, H, W, 3) in [-1, 1] at 25 fps -> sync_f
  (B, S*8, D), S = (T - 16) // 8 + 1, all B*S segments in one batch. Raises ValueError if T < 16."""
  if video.ndim != 5:
    raise ValueError(f'encode_video: expected video (B, T, H, W, 3), got shape {video.shape}')
  b, t = video.shape[:2]
  starts = segment_indices(config, t)[:, 0]
  segments = jnp.stack([video[:, i:i + config.frames_per_segment] for i in starts], axis=1)  # (B, S, 16, H, W, 3)
  segments = segments.reshape((-1,) + segments.shape[2:])  # (B*S, 16, H, W, 3), b-major like MMAudio
  out = encode_segments(config, params, segments, dtype, precision)  # (B*S, 8, D)
  return out.reshape(b, -1, out.shape[-1])
