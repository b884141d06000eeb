"""open_clip's CLIP (both towers) in Flax, run as MMAudio runs DFN5B ViT-H/14-384.

MMAudio conditions on two CLIP outputs:
  * `encode_images`: per frame, conv1 patchify (kernel = stride = patch; pixels beyond
    floor(H / p) * p are dropped, so 384 px frames give the 27 x 27 grid of the 378 px model) ->
    [class_embedding; patches] + positional_embedding -> ln_pre -> pre-norm QuickGELU blocks ->
    ln_post on token 0 -> @ visual.proj -> x / max(|x|, 1e-12). (B*T, D) clip_f.
  * `encode_text`: MMAudio's patched `encode_text`: token_embedding + positional_embedding ->
    causal blocks -> ln_final -> per-token L2 norm. No EOT pooling and no `text_projection`; all
    context positions are returned, pads (id 0, the '!' token) included.
`text_projection` and `logit_scale` are loaded (open_clip loads strictly) but unused.

Params mirror `open_clip.CLIP.state_dict()` through `convert.state_dict.flax_leaf`
(`visual.conv1.weight` (W, 3, p, p) -> visual/conv1/kernel (p, p, 3, W); blocks through the shared
`encoders.transformer.Transformer`; `token_embedding` is an nn.Embed). `class_embedding`,
`positional_embedding`, `proj`, `text_projection`, `logit_scale` are raw params in torch layout
(`proj` is applied as x @ P). Images are channels-last (N, H, W, 3). Params are float32; the compute
dtype is `dtype`, or else follows inputs and params, so float64 runs work. LayerNorm eps 1e-5.
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
EPS = 1e-5
# torchvision Normalize stats of OpenAI CLIP, which DFN5B's hub config repeats and MMAudio applies.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """open_clip `CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu)`; what MMAudio's model uses."""
  embed_dim: int  # width of visual.proj / text_projection outputs
  image_size: int  # positional grid = image_size // patch_size (378 and 384 give the same model)
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int  # open_clip: width // head_width (DFN5B: 1280 // 80)
  vision_mlp_ratio: float
  context_length: int
  vocab_size: int
  text_width: int
  text_heads: int
  text_layers: int
  activation: str = 'quick_gelu'  # 'quick_gelu' (OpenAI / DFN weights) or 'gelu'
  text_mlp_ratio: float = 4.0  # fixed in open_clip's text tower

  def __post_init__(self):
    if self.activation not in ('quick_gelu', 'gelu'):
      raise ValueError(f"CLIPConfig.activation must be 'quick_gelu' or 'gelu', got {self.activation!r}")
    for width, heads, what in ((self.vision_width, self.vision_heads, 'vision'),
                               (self.text_width, self.text_heads, 'text')):
      if heads < 1 or width % heads:
        raise ValueError(f'CLIPConfig: {what} width {width} is not divisible by {heads} heads')
    if self.image_size < self.patch_size:
      raise ValueError(f'CLIPConfig: image_size {self.image_size} < patch_size {self.patch_size}')

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def vision_mlp_width(self) -> int:
    return int(self.vision_width * self.vision_mlp_ratio)  # open_clip's rounding

  @property
  def text_mlp_width(self) -> int:
    return int(self.text_width * self.text_mlp_ratio)


# apple/DFN5B-CLIP-ViT-H-14-384 (now -378): open_clip ViT-H-14-378-quickgelu. MMAudio feeds 384 px.
DFN5B_H14_384 = CLIPConfig(embed_dim=1024, image_size=384, patch_size=14, vision_width=1280,
                           vision_layers=32, vision_heads=16, vision_mlp_ratio=4.0, context_length=77,
                           vocab_size=49408, text_width=1024, text_heads=16, text_layers=24)
# Seeded CPU demo; the full vocabulary so real tokenizer ids fit.
TINY_CLIP = CLIPConfig(embed_dim=64, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                       vision_heads=2, vision_mlp_ratio=4.0, context_length=16, vocab_size=49408,
                       text_width=64, text_heads=2, text_layers=2)
CLIP_PRESETS = {'dfn5b_h14_384': DFN5B_H14_384, 'tiny': TINY_CLIP}


def _normal(std: float):
  return nn.initializers.normal(std)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """torch F.normalize: x / max(|x|_2, eps) over the last axis, the norm in at least float32."""
  norm = jnp.linalg.norm(x.astype(norm_dtype(x.dtype)), axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps).astype(x.dtype)


def causal_mask(length: int) -> Array:
  """open_clip's text `attn_mask`: additive, -inf strictly above the diagonal."""
  return jnp.where(jnp.triu(jnp.ones((length, length), bool), 1), -jnp.inf, 0.0).astype(jnp.float32)


class VisionTransformer(nn.Module):
  """open_clip `VisionTransformer` (pool 'tok', no attentional pooler): (N, H, W, 3) -> (N, embed)."""
  config: CLIPConfig
  dtype: Any = None
  precision: str = 'highest'
  attention_impl: str = 'reference'

  @nn.compact
  def __call__(self, images: Array) -> Array:
    cfg = self.config
    w, p = cfg.vision_width, cfg.patch_size
    x = nn.Conv(w, (p, p), strides=(p, p), padding='VALID', use_bias=False, dtype=self.dtype,
                param_dtype=jnp.float32, precision=PRECISIONS[self.precision], name='conv1')(images)
    n = x.shape[0]
    x = x.reshape(n, -1, w)  # (N, G*G, W), row-major grid
    scale = w ** -0.5
    cls = self.param('class_embedding', _normal(scale), (w,), jnp.float32).astype(x.dtype)
    pos = self.param('positional_embedding', _normal(scale), (cfg.grid_size ** 2 + 1, w), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, w)), x], axis=1) + pos.astype(x.dtype)  # (N, 1+G*G, W)
    x = layer_norm(x, EPS, 'ln_pre')
    x = Transformer(cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp_width, cfg.activation, EPS,
                    dtype=self.dtype, precision=self.precision, attention_impl=self.attention_impl,
                    name='transformer')(x)
    pooled = layer_norm(x[:, 0], EPS, 'ln_post')  # ln_post is per token: only token 0 is used
    proj = self.param('proj', _normal(scale), (w, cfg.embed_dim), jnp.float32)
    return jnp.matmul(pooled, proj.astype(pooled.dtype), precision=PRECISIONS[self.precision])  # (N, E)


class CLIP(nn.Module):
  """Both towers with open_clip's param names. `__call__(images, tokens)` runs whichever is given:
  image embeddings (N, embed_dim), unnormalised, and ln_final token states (N, L, text_width)."""
  config: CLIPConfig
  dtype: Any = None
  precision: str = 'highest'
  attention_impl: str = 'reference'

  @nn.compact
  def __call__(self, images: Array | None = None, tokens: Array | None = None):
    cfg = self.config
    kw = dict(dtype=self.dtype, precision=self.precision, attention_impl=self.attention_impl)
    image_out = None if images is None else VisionTransformer(cfg, name='visual', **kw)(images)
    # text tower: top-level params in open_clip
    w = cfg.text_width
    embed = nn.Embed(cfg.vocab_size, w, dtype=self.dtype, param_dtype=jnp.float32,
                     embedding_init=_normal(0.02), name='token_embedding')
    pos = self.param('positional_embedding', _normal(0.01), (cfg.context_length, w), jnp.float32)
    self.param('text_projection', _normal(w ** -0.5), (w, cfg.embed_dim), jnp.float32)
    self.param('logit_scale', nn.initializers.constant(np.log(1 / 0.07)), (), jnp.float32)
    text_out = None
    if tokens is not None:
      length = tokens.shape[-1]
      x = embed(tokens)
      x = x + pos[:length].astype(x.dtype)  # (N, L, W)
      x = Transformer(cfg.text_layers, cfg.text_heads, cfg.text_mlp_width, cfg.activation, EPS,
                      name='transformer', **kw)(x, causal_mask(length))
      text_out = layer_norm(x, EPS, 'ln_final')
    return image_out, text_out


def encode_images(cfg: CLIPConfig, params, images: Array, *, normalize: bool = True, dtype: Any = None,
                  precision: str = 'highest', attention_impl: str = 'reference') -> Array:
  """Normalised frames (..., H, W, 3) (see `normalize_images`) -> (..., embed_dim) image embeddings,
  L2-normalised as MMAudio's clip_f (`normalize=False`: before that). H, W must give the config's
  patch grid: floor(H / patch) = image_size // patch; nothing is interpolated."""
  images = jnp.asarray(images)
  if images.ndim < 4 or images.shape[-1] != 3:
    raise ValueError(f'encode_images: expected channels-last RGB images (N, H, W, 3), got shape {images.shape}')
  grid = (images.shape[-3] // cfg.patch_size, images.shape[-2] // cfg.patch_size)
  if grid != (cfg.grid_size, cfg.grid_size):
    raise ValueError(f'encode_images: {images.shape[-3]}x{images.shape[-2]} px give a {grid[0]}x{grid[1]} '
                     f'patch grid, the model has {cfg.grid_size}x{cfg.grid_size} (image_size '
                     f'{cfg.image_size}, patch {cfg.patch_size})')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f'encode_images: expected float images (use normalize_images), got {images.dtype}')
  lead = images.shape[:-3]
  model = CLIP(cfg, dtype, precision, attention_impl)
  x, _ = model.apply({'params': params}, images=images.reshape((-1,) + images.shape[-3:]))
  x = l2_normalize(x) if normalize else x
  return x.reshape(lead + x.shape[-1:])


def encode_text(cfg: CLIPConfig, params, tokens: Array, *, normalize: bool = True, dtype: Any = None,
                precision: str = 'highest', attention_impl: str = 'reference') -> Array:
  """Token ids (..., L), L <= context_length (77 for MMAudio) -> (..., L, text_width) causal token
  states, each L2-normalised (MMAudio's text_f; `normalize=False`: the ln_final output)."""
  tokens = jnp.asarray(tokens)
  if tokens.ndim < 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f'encode_text: expected integer token ids (N, L), got {tokens.dtype} {tokens.shape}')
  if tokens.shape[-1] > cfg.context_length:
    raise ValueError(f'encode_text: {tokens.shape[-1]} tokens, the model takes at most {cfg.context_length}')
  lead = tokens.shape[:-1]
  model = CLIP(cfg, dtype, precision, attention_impl)
  _, x = model.apply({'params': params}, tokens=tokens.reshape(-1, tokens.shape[-1]))
  x = l2_normalize(x) if normalize else x
  return x.reshape(lead + x.shape[-2:])


def normalize_images(frames: Array) -> Array:
  """RGB frames (..., H, W, 3), uint8 or float in [0, 1] -> OpenAI mean/std normalised, float32
  (float64 input stays float64), as MMAudio's FeaturesUtils does after ToDtype(scale=True)."""
  x = jnp.asarray(frames)
  if x.shape[-1:] != (3,):
    raise ValueError(f'normalize_images: expected channels-last RGB (..., H, W, 3), got shape {x.shape}')
  if x.dtype == jnp.uint8:
    x = x.astype(jnp.float32) / 255.0
  elif jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  else:
    raise ValueError(f'normalize_images: expected uint8 or float frames, got {x.dtype}')
  mean, std = jnp.asarray(OPENAI_MEAN, x.dtype), jnp.asarray(OPENAI_STD, x.dtype)
  return (x - mean) / std


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: CLIPConfig, key: Array) -> dict:
  images = jnp.zeros((1, cfg.grid_size * cfg.patch_size, cfg.grid_size * cfg.patch_size, 3), jnp.float32)
  tokens = jnp.zeros((1, cfg.context_length), jnp.int32)
  return CLIP(cfg).init(key, images, tokens)['params']


def init_clip(cfg: CLIPConfig, seed: int = 0) -> dict:
  """Seeded random float32 params with open_clip's embedding inits (full size: ~1e9 params, use
  jax.eval_shape for shapes only)."""
  return _init(cfg, jax.random.key(seed))
