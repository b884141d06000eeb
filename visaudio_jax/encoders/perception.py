"""Meta's Perception Encoder vision tower (`core/vision_encoder/pe.py: VisionTransformer`), PE-Spatial
family, as patch-token feature maps: `forward_features(img, strip_cls_token=True)` reshaped to
(B, gh, gw, width).

Forward: patchify conv (no bias, kernel = stride = patch; pixels beyond floor(H / p) * p dropped)
-> row-major tokens -> [CLS,] -> + absolute posemb (bilinearly resized when the grid differs from
the pretrain grid, CLS row kept) -> ln_pre -> pre-norm blocks with 2D RoPE on q and k (exact GELU,
LayerScale for G14) -> tokens. `ln_post` is Identity for every Spatial model, so it does not exist
here. Param names mirror the checkpoint keys (no prefix) through `convert.state_dict.flax_leaf`:
`conv1.weight` (W, 3, p, p) -> conv1/kernel (p, p, 3, W), `transformer.resblocks.N.*` -> the
shared `encoders.transformer.Transformer`. Images are channels-last (B, H, W, 3) in [-1, 1].

2D RoPE (`rope.py: Rope2D`): head_dim dh, d = dh / 2, inv_freq[i] = 10000^(-2i / d) for i < d / 2;
each token's dh angles are [px f0, px f0, px f1, px f1, ... | py f0, py f0, ...] (x first), with
px, py = patch column, row + 1 when there is a CLS token (which gets angle 0); adjacent channel
pairs (2k, 2k+1) are rotated. Like the original, the tables are float32 even in float64 runs
(`rope_dtype` float64 gives the all-float64 variant).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax.encoders.transformer import Transformer, layer_norm
from visaudio_jax.model.layers import PRECISIONS, norm_dtype

Array = jax.Array
LN_EPS = 1e-5
ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class PEConfig:
  """`PEConfig` of the vision tower; Spatial models have pool_type 'none', no ln_post, no proj."""
  image_size: int  # pretrain size: the absolute posemb is (cls + grid^2, width)
  patch_size: int
  width: int
  layers: int
  heads: int
  mlp_width: int  # int(width * mlp_ratio)
  use_cls_token: bool
  layer_scale: bool  # ls_1 / ls_2 gamma in every block (ls_init_value set: G14)
  use_abs_posemb: bool = True
  use_rope2d: bool = True
  use_ln_pre: bool = True

  def __post_init__(self):
    if self.width % self.heads:
      raise ValueError(f'PEConfig: width {self.width} not divisible by {self.heads} heads')
    if self.use_rope2d and self.head_dim % 4:
      raise ValueError(f'PEConfig: 2D RoPE needs head_dim % 4 == 0, got {self.head_dim}')

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.width // self.heads


PE_SPATIAL_G14_448 = PEConfig(image_size=448, patch_size=14, width=1536, layers=50, heads=16, mlp_width=8960,
                              use_cls_token=False, layer_scale=True)
PE_SPATIAL_L14_448 = PEConfig(image_size=448, patch_size=14, width=1024, layers=24, heads=16, mlp_width=4096,
                              use_cls_token=True, layer_scale=False)
PE_SPATIAL_B16_512 = PEConfig(image_size=512, patch_size=16, width=768, layers=12, heads=12, mlp_width=3072,
                              use_cls_token=True, layer_scale=False)
PE_SPATIAL_S16_512 = PEConfig(image_size=512, patch_size=16, width=384, layers=12, heads=6, mlp_width=1536,
                              use_cls_token=True, layer_scale=False)
PE_SPATIAL_T16_512 = PEConfig(image_size=512, patch_size=16, width=192, layers=12, heads=3, mlp_width=768,
                              use_cls_token=True, layer_scale=False)
# Seeded CPU demo: 64 px -> 4x4 grid.
TINY_PE = PEConfig(image_size=64, patch_size=16, width=32, layers=2, heads=2, mlp_width=128,
                   use_cls_token=True, layer_scale=False)
PE_PRESETS = {
    'PE-Spatial-G14-448': PE_SPATIAL_G14_448,
    'PE-Spatial-L14-448': PE_SPATIAL_L14_448,
    'PE-Spatial-B16-512': PE_SPATIAL_B16_512,
    'PE-Spatial-S16-512': PE_SPATIAL_S16_512,
    'PE-Spatial-T16-512': PE_SPATIAL_T16_512,
    'tiny': TINY_PE,
}


def normalize_images(images: Array | np.ndarray, dtype: Any = jnp.float32) -> Array:
  """uint8 RGB -> (x / 255 - 0.5) / 0.5 in `dtype` (ToTensor + Normalize(0.5, 0.5)), bitwise as
  torch computes it in that dtype: a 256-entry table (XLA would turn / 255 into * (1 / 255))."""
  dtype = np.dtype(dtype)
  images = jnp.asarray(images)
  if images.dtype != jnp.uint8:
    raise ValueError(f'normalize_images: expected uint8 images, got {images.dtype}')
  table = (np.arange(256, dtype=dtype) / dtype.type(255) - dtype.type(0.5)) / dtype.type(0.5)
  return jnp.asarray(table)[images]


# ---------------------------------------------------------------------------------------------
# Position encodings (tables are numpy constants: grid sizes are static under jit)


def rope2d_tables(cfg: PEConfig, grid_h: int, grid_w: int, dtype: Any = np.float32
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(angles, cos, sin), each (cls + grid_h * grid_w, head_dim), computed in `dtype` like `Rope2D`.

  The float32 angles are bitwise the original's. float32 cos / sin are rounded from float64
  (correctly rounded); torch's own float32 cos / sin are off by up to 1 ulp at a few angles.
  """
  dtype = np.dtype(dtype)
  d = cfg.head_dim // 2
  inv_freq = (dtype.type(1) / dtype.type(ROPE_THETA) ** (np.arange(0, d, 2, dtype=dtype)[:d // 2] / dtype.type(d)))
  inv_freq = inv_freq.astype(dtype)
  offset = 1 if cfg.use_cls_token else 0
  def freqs(n):  # (n, d): position * inv_freq, each frequency twice
    return np.repeat((np.arange(n, dtype=dtype) + dtype.type(offset))[:, None] * inv_freq[None], 2, axis=-1)
  fx = np.broadcast_to(freqs(grid_w)[None], (grid_h, grid_w, d))
  fy = np.broadcast_to(freqs(grid_h)[:, None], (grid_h, grid_w, d))
  angles = np.concatenate([fx, fy], axis=-1).reshape(grid_h * grid_w, 2 * d)
  if cfg.use_cls_token:
    angles = np.concatenate([np.zeros((1, 2 * d), dtype), angles])
  angles = angles.astype(dtype)
  a64 = angles.astype(np.float64)
  return angles, np.cos(a64).astype(dtype), np.sin(a64).astype(dtype)


def rotations_from_tables(cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
  """(N, dh) cos / sin tables -> (N, dh / 2, 2, 2) pair rotations for `apply_rope`:
  out[2k] = t[2k] cos[2k] - t[2k+1] sin[2k], out[2k+1] = t[2k+1] cos[2k+1] + t[2k] sin[2k+1]."""
  cos, sin = np.asarray(cos), np.asarray(sin)
  c0, c1, s0, s1 = cos[:, 0::2], cos[:, 1::2], sin[:, 0::2], sin[:, 1::2]
  return np.stack([np.stack([c0, -s0], -1), np.stack([s1, c1], -1)], -2)


def rope2d_rotations(cfg: PEConfig, grid_h: int, grid_w: int, dtype: Any = np.float32) -> np.ndarray:
  """(cls + grid_h * grid_w, head_dim / 2, 2, 2) RoPE rotations, tables in `dtype`."""
  _, cos, sin = rope2d_tables(cfg, grid_h, grid_w, dtype)
  return rotations_from_tables(cos, sin)


@functools.cache
def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """torch linear interpolation (align_corners=False, no antialias) along one axis: source
  (dst + 0.5) * in / out - 0.5 clamped at 0, taps floor and floor + 1 (clamped to the edge)."""
  src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = src.astype(np.int32)
  i1 = np.minimum(i0 + 1, in_size - 1)
  l1 = src - i0
  return i0, i1, 1.0 - l1, l1


def _resize_axis(x: Array, axis: int, size: int) -> Array:
  i0, i1, l0, l1 = _linear_taps(x.shape[axis], size)
  shape = [1] * x.ndim
  shape[axis] = size
  l0, l1 = jnp.asarray(l0, x.dtype).reshape(shape), jnp.asarray(l1, x.dtype).reshape(shape)
  return jnp.take(x, i0, axis=axis) * l0 + jnp.take(x, i1, axis=axis) * l1


def sample_abs_posemb(cfg: PEConfig, positional_embedding: Array, grid_h: int, grid_w: int) -> Array:
  """`_sample_abs_posemb`: the (cls + G^2, W) table as is on the pretrain grid, else its G x G part
  resized like F.interpolate(bilinear, align_corners=False, antialias=False) -> (cls + gh * gw, W)."""
  g = cfg.grid
  if (grid_h, grid_w) == (g, g):
    return positional_embedding
  cls = 1 if cfg.use_cls_token else 0
  head, table = positional_embedding[:cls], positional_embedding[cls:].reshape(g, g, -1)
  table = _resize_axis(_resize_axis(table, 1, grid_w), 0, grid_h)  # (gh, gw, W)
  return jnp.concatenate([head, table.reshape(grid_h * grid_w, -1)], axis=0)


# ---------------------------------------------------------------------------------------------
# Module


def check_images(cfg: PEConfig, images) -> tuple[int, int]:
  """(B, H, W, 3) with H, W >= patch -> the token grid (gh, gw)."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Perception Encoder: expected channels-last RGB images (B, H, W, 3), got shape {images.shape}')
  _, h, w, _ = images.shape
  p = cfg.patch_size
  if h < p or w < p:
    raise ValueError(f'Perception Encoder: images {h}x{w} are smaller than one {p}x{p} patch')
  return h // p, w // p


class PerceptionEncoder(nn.Module):
  """`VisionTransformer.forward` of a PE-Spatial model (ln_post = Identity): all tokens, CLS first
  when the model has one. `rot` overrides the RoPE rotations (N, head_dim / 2, 2, 2)."""
  config: PEConfig
  dtype: Any = None
  precision: str = 'highest'
  attention_impl: str = 'reference'
  rope_dtype: Any = np.float32

  @nn.compact
  def __call__(self, images: Array, rot: Array | None = None) -> Array:  # (B, H, W, 3)
    cfg = self.config
    gh, gw = check_images(cfg, images)
    b, p, width = images.shape[0], cfg.patch_size, cfg.width
    init = nn.initializers.normal(width ** -0.5)
    x = images[:, :gh * p, :gw * p]
    x = nn.Conv(width, (p, p), strides=(p, p), padding='VALID', use_bias=False, dtype=self.dtype,
                param_dtype=jnp.float32, precision=PRECISIONS[self.precision], name='conv1')(x)
    x = x.reshape(b, gh * gw, width)  # row-major: y slow, x fast
    if cfg.use_cls_token:
      cls = self.param('class_embedding', init, (width,), jnp.float32).astype(x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)), x], axis=1)
    if cfg.use_abs_posemb:
      pos = self.param('positional_embedding', init, (int(cfg.use_cls_token) + cfg.grid ** 2, width), jnp.float32)
      x = x + sample_abs_posemb(cfg, pos.astype(norm_dtype(x.dtype)), gh, gw).astype(x.dtype)
    if cfg.use_ln_pre:
      x = layer_norm(x, LN_EPS, 'ln_pre')
    if not cfg.use_rope2d:
      rot = None
    elif rot is None:
      rot = rope2d_rotations(cfg, gh, gw, self.rope_dtype)
    return Transformer(cfg.layers, cfg.heads, cfg.mlp_width, 'gelu', LN_EPS, cfg.layer_scale, self.dtype,
                       self.precision, self.attention_impl, name='transformer')(x, None, rot)


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: PEConfig, key: Array) -> dict:
  images = jnp.zeros((1, cfg.patch_size, cfg.patch_size, 3), jnp.float32)  # params don't depend on H, W
  return PerceptionEncoder(cfg).init(key, images)['params']


def init_perception(cfg: PEConfig, seed: int = 0) -> dict:
  """Seeded random float32 params (jitted; use jax.eval_shape for full-size shapes only)."""
  return _init(cfg, jax.random.key(seed))


def perception_tokens(cfg: PEConfig, params: dict, images: Array, *, dtype: Any = None,
                      precision: str = 'highest', attention_impl: str = 'reference',
                      rope_dtype: Any = np.float32, rot: Array | None = None) -> Array:
  """torch `model(images)` for a Spatial model: (B, H, W, 3) -> (B, [1 +] gh * gw, width)."""
  module = PerceptionEncoder(cfg, dtype, precision, attention_impl, rope_dtype)
  return module.apply({'params': params}, images, rot)


def encode_images(cfg: PEConfig, params: dict, images: Array, *, dtype: Any = None,
                  precision: str = 'highest', attention_impl: str = 'reference',
                  rope_dtype: Any = np.float32, rot: Array | None = None) -> Array:
  """Patch-token feature map (`forward_features(strip_cls_token=True)`): images (B, H, W, 3) in
  [-1, 1], any H, W >= patch -> (B, H // p, W // p, width). jit with `cfg` static."""
  gh, gw = check_images(cfg, images)
  x = perception_tokens(cfg, params, images, dtype=dtype, precision=precision,
                        attention_impl=attention_impl, rope_dtype=rope_dtype, rot=rot)
  x = x[:, int(cfg.use_cls_token):]
  return x.reshape(x.shape[0], gh, gw, cfg.width)


def perception_flops(cfg: PEConfig, image_h: int, image_w: int) -> float:
  """Forward FLOPs per image (2 x multiply-adds) of the patchify conv, q/k/v/out projections,
  the two attention matmuls (q k^T, p v) and the MLP; norms, softmax, RoPE, GELU and biases are
  left out (< 1%)."""
  gh, gw = image_h // cfg.patch_size, image_w // cfg.patch_size
  n, w = gh * gw + int(cfg.use_cls_token), cfg.width
  patchify = 2 * gh * gw * 3 * cfg.patch_size ** 2 * w
  per_layer = 2 * n * 4 * w * w + 2 * 2 * n * n * w + 2 * 2 * n * w * cfg.mlp_width
  return float(patchify + cfg.layers * per_layer)
