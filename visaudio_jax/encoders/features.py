"""One entry point from videos and captions to the network's conditioning features.

    clip_f (B, T_clip, D_clip)      CLIP image embeddings, 8 fps, 384 px squash
    sync_f (B, S * 8, D_sync)       Synchformer, 25 fps, 224 px short side + centre crop
    text_f (B, context, D_text)     CLIP text token states
    pe_f   (B, T_pe, gh, gw, D_pe)  Perception Encoder patch maps (the spacetime module's input)

Each encoder is one jitted function of (params, uint8 frames) that resizes on the device, so a
batch of clips goes through each encoder in one call on any backend. Frame rates, sizes and the
encoder variants are an `EncodersConfig`; `ENCODER_PRESETS['mmaudio']` is MMAudio's setup plus
PE-Spatial-B16 at 224 px and 4 fps (ours), `'tiny'` the seeded small encoders of the CPU demo.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax.encoders import clip as clip_lib
from visaudio_jax.encoders import perception as pe_lib
from visaudio_jax.encoders import synchformer as sync_lib
from visaudio_jax.encoders.tokenizer import ClipTokenizer
from visaudio_jax.encoders.video import read_frames, resize_frames

STREAMS = ('clip', 'sync', 'pe')


@dataclasses.dataclass(frozen=True)
class EncodersConfig:
  clip: clip_lib.CLIPConfig
  sync: sync_lib.SynchformerConfig
  pe: pe_lib.PEConfig | None  # None: no spacetime features
  clip_fps: float = 8.0
  clip_size: int = 384
  sync_fps: float = 25.0
  sync_size: int = 224
  pe_fps: float = 4.0
  pe_size: int = 224

  def fps(self, stream: str) -> float:
    return getattr(self, f'{stream}_fps')

  @property
  def streams(self) -> tuple[str, ...]:
    return STREAMS if self.pe is not None else STREAMS[:2]


ENCODER_PRESETS = {
    'mmaudio': EncodersConfig(clip_lib.DFN5B_H14_384, sync_lib.SYNCHFORMER, pe_lib.PE_PRESETS['PE-Spatial-B16-512']),
    'tiny': EncodersConfig(clip_lib.TINY_CLIP, sync_lib.TINY_SYNCHFORMER, pe_lib.TINY_PE,
                           clip_size=32, sync_size=32, pe_size=64),
}


def encoders_config(name: str) -> EncodersConfig:
  if name not in ENCODER_PRESETS:
    raise ValueError(f'unknown encoders preset {name!r}; expected one of {sorted(ENCODER_PRESETS)}')
  return ENCODER_PRESETS[name]


def init_encoders(cfg: EncodersConfig, seed: int = 0) -> dict:
  """Seeded random params for every encoder (the tiny demo's weights; full size for benchmarks)."""
  params = {'clip': clip_lib.init_clip(cfg.clip, seed), 'sync': sync_lib.init_synchformer(cfg.sync, seed + 1)}
  if cfg.pe is not None:
    params['pe'] = pe_lib.init_perception(cfg.pe, seed + 2)
  return params


def decode_video(path: str | os.PathLike, cfg: EncodersConfig, duration_s: float, pad: bool = False
                 ) -> dict[str, np.ndarray]:
  """One decode of `path` -> uint8 (T, H, W, 3) frames at each encoder's rate (MMAudio's rule)."""
  frames = read_frames(path, [cfg.fps(s) for s in cfg.streams], duration_s, pad=pad)
  return dict(zip(cfg.streams, frames))


@functools.partial(jax.jit, static_argnames=('cfg',))
def clip_features(cfg: EncodersConfig, params, frames: jax.Array) -> jax.Array:
  """uint8 (B, T, H, W, 3) -> (B, T, D): squash to clip_size (bicubic), OpenAI mean/std, CLIP."""
  b, t = frames.shape[:2]
  images = clip_lib.normalize_images(resize_frames(frames, cfg.clip_size, 'squash'))
  return clip_lib.encode_images(cfg.clip, params, images.reshape((b * t,) + images.shape[2:])).reshape(b, t, -1)


@functools.partial(jax.jit, static_argnames=('cfg',))
def sync_features(cfg: EncodersConfig, params, frames: jax.Array) -> jax.Array:
  """uint8 (B, T, H, W, 3) -> (B, S * 8, D): short side to sync_size, centre crop, [-1, 1]."""
  video = sync_lib.normalize_frames(resize_frames(frames, cfg.sync_size, 'crop'))
  return sync_lib.encode_video(cfg.sync, params, video)


@functools.partial(jax.jit, static_argnames=('cfg',))
def pe_features(cfg: EncodersConfig, params, frames: jax.Array) -> jax.Array:
  """uint8 (B, T, H, W, 3) -> (B, T, gh, gw, D): squash to pe_size (bilinear), [-1, 1], PE."""
  b, t = frames.shape[:2]
  images = pe_lib.normalize_images(resize_frames(frames, cfg.pe_size, 'squash_bilinear'))
  maps = pe_lib.encode_images(cfg.pe, params, images.reshape((b * t,) + images.shape[2:]))
  return maps.reshape((b, t) + maps.shape[1:])


@functools.partial(jax.jit, static_argnames=('cfg',))
def text_features(cfg: EncodersConfig, params, tokens: jax.Array) -> jax.Array:
  return clip_lib.encode_text(cfg.clip, params, tokens)


STREAM_FEATURES = {'clip': clip_features, 'sync': sync_features, 'pe': pe_features}


def extract(source: Any, caption: str | Sequence[str], cfg: EncodersConfig, params: Mapping,
            duration_s: float | None = None, pad: bool = False) -> dict[str, np.ndarray]:
  """Videos and captions -> {clip_f, sync_f, text_f[, pe_f]}, each with a leading batch axis.

  `source`: a video path, a frames dict {'clip', 'sync'[, 'pe']: uint8 (T, H, W, 3)} as
  `decode_video` returns, or a list of either (one clip each; same duration, same frame sizes per
  stream). Paths need `duration_s`. `caption`: one string per clip ('' for none).
  """
  sources = list(source) if isinstance(source, (list, tuple)) else [source]
  captions = [caption] * len(sources) if isinstance(caption, str) else list(caption)
  if len(captions) != len(sources):
    raise ValueError(f'extract: {len(sources)} videos but {len(captions)} captions')
  clips = []
  for s in sources:
    if isinstance(s, (str, os.PathLike)):
      if duration_s is None:
        raise ValueError('extract: duration_s is needed to decode video files')
      s = decode_video(s, cfg, duration_s, pad)
    missing = [k for k in cfg.streams if k not in s]
    if missing:
      raise ValueError(f'extract: frames dict lacks streams {missing}; expected keys {list(cfg.streams)}')
    clips.append(s)
  out = {}
  for stream in cfg.streams:
    shapes = {c[stream].shape for c in clips}
    if len(shapes) != 1:
      raise ValueError(f'extract: clips differ in {stream} frame shapes {sorted(shapes)}; batch equal clips')
    frames = jnp.asarray(np.stack([c[stream] for c in clips]))
    if frames.dtype != jnp.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
      raise ValueError(f'extract: {stream} frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape[1:]}')
    out[f'{stream}_f'] = np.asarray(STREAM_FEATURES[stream](cfg, params[stream], frames))
  tokens = ClipTokenizer()(captions, context_length=cfg.clip.context_length)
  out['text_f'] = np.asarray(text_features(cfg, params['clip'], jnp.asarray(tokens)))
  return out
