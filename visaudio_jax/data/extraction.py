"""Feature extraction: (video, binaural wav, caption) triples -> training examples -> TFRecord shards.

Each clip is probed first (cheap: container streams, audio channels, durations), so unusable clips
are skipped with a reason before any model runs and the shard layout depends only on the manifest.
Then clips go in batches through the conditioning encoders (`visaudio_jax.encoders.extract`) and
the audio codec (both ears batched), and `shards.write_split` writes them; a rerun after an
interruption recomputes only the shards that are missing.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import soundfile
from absl import logging
from tqdm import tqdm

from visaudio_jax import components, encoders, files
from visaudio_jax.audio import codec as codec_lib
from visaudio_jax.audio.wav import read_wav
from visaudio_jax.data import shards
from visaudio_jax.data.schema import ShardSpec
from visaudio_jax.model.config import NetworkConfig, network_config


@dataclasses.dataclass(frozen=True)
class ClipSource:
  id: str
  video: str
  wav: str
  caption: str = ''
  metadata: str | None = None  # JSON with per-frame tracks (synthetic sets: BiAudio-mini)


def read_manifest(path: str | os.PathLike) -> list[ClipSource]:
  """JSON lines with `video`, `wav`, optional `caption`, `id`, `metadata`; relative paths are
  relative to the manifest's folder."""
  path = pathlib.Path(path)
  root, clips = path.parent, []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      video, wav = row['video'], row['wav']
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
      raise ValueError(f'{path}:{n}: expected a JSON object with "video" and "wav" ({exc!r})') from None
    resolve = lambda p: str(p if os.path.isabs(p) else root / p)  # noqa: E731
    clips.append(ClipSource(id=str(row.get('id') or pathlib.Path(video).stem), video=resolve(video),
                            wav=resolve(wav), caption=str(row.get('caption', '')),
                            metadata=resolve(row['metadata']) if row.get('metadata') else None))
  ids = [c.id for c in clips]
  if len(set(ids)) != len(ids):
    raise ValueError(f'{path}: duplicate clip ids {sorted({i for i in ids if ids.count(i) > 1})[:5]}')
  return clips


def probe(clip: ClipSource, duration_s: float) -> str | None:
  """Why `clip` cannot give a `duration_s` training example, or None if it can."""
  import av

  try:
    info = soundfile.info(clip.wav)
  except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
    return f'unreadable audio ({exc})'
  if info.channels != 2:
    return f'{"mono" if info.channels == 1 else f"{info.channels}-channel"} audio (binaural needs 2 channels)'
  if info.frames / info.samplerate < duration_s:
    return f'audio too short ({info.frames / info.samplerate:.2f} s < {duration_s} s)'
  try:
    with av.open(clip.video) as container:
      if not container.streams.video:
        return 'no video stream'
      stream = container.streams.video[0]
      seconds = None
      if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
      elif container.duration is not None:
        seconds = container.duration / av.time_base
  except (av.error.FFmpegError, OSError) as exc:
    return f'unreadable video ({exc})'
  if seconds is not None and seconds + 1e-3 < duration_s:
    return f'video too short ({seconds:.2f} s < {duration_s} s)'
  return None


class Extractor:
  """Encoders + codec for one experiment config; `__call__(clips)` -> example dicts, batched."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.net: NetworkConfig = network_config(config.model)
    self.enc_cfg, self.enc_params = components.encoders_from_config(config.encoders, config.seed)
    self.codec_cfg, self.codec_params = components.load_codec(config.codec)
    if self.codec_params is None:
      raise ValueError(f'codec {config.codec.preset!r} needs codec.vae_ckpt and codec.vocoder_ckpt to encode audio')
    codec_lib.check_matches_network(self.codec_cfg, self.net)
    self.samples = self.net.seq_lens().audio_samples
    cfg = self.codec_cfg
    self._encode = jax.jit(lambda p, w: codec_lib.encode_binaural(cfg, p, w))

  def audio(self, clip: ClipSource) -> np.ndarray:
    wave, rate = read_wav(clip.wav)
    wave = codec_lib.prepare_waveform(wave, rate, self.codec_cfg, resample=True, name=clip.wav)[0]
    if wave.shape[-1] < self.samples:
      raise ValueError(f'{clip.wav}: {wave.shape[-1]} samples, need {self.samples}')
    return wave[:, :self.samples]  # (2, samples)

  def metadata(self, clip: ClipSource, frames: int) -> dict[str, np.ndarray]:
    """BiAudio-mini tracks (one value per video frame at `fps`) sampled at the CLIP frame times:
    the first source's head-relative azimuth and the camera yaw, (frames,) degrees."""
    if not clip.metadata:
      raise ValueError(f'{clip.id}: the shard spec stores metadata, but the manifest gives none')
    meta = json.loads(pathlib.Path(clip.metadata).read_text())
    try:
      fps, azimuth, yaw = meta['fps'], meta['sources'][0]['azimuth_deg'], meta['camera_yaw_deg']
    except (KeyError, IndexError, TypeError) as exc:
      raise ValueError(f'{clip.metadata}: expected fps, sources[0].azimuth_deg and camera_yaw_deg ({exc!r})') from None
    times = np.arange(frames) / self.net.clip_fps
    index = np.minimum(np.round(times * fps).astype(int), len(azimuth) - 1)
    return {'source_azimuth_deg': np.asarray(azimuth, np.float32)[index],
            'camera_yaw_deg': np.asarray(yaw, np.float32)[index]}

  def __call__(self, clips: list[ClipSource], spec: ShardSpec) -> list[dict[str, Any]]:
    duration = self.net.duration_s
    frames = [encoders.decode_video(c.video, self.enc_cfg, duration, pad=True) for c in clips]
    feats = encoders.extract(frames, [c.caption for c in clips], self.enc_cfg, self.enc_params)
    waves = np.stack([self.audio(c) for c in clips])  # (B, 2, samples)
    post = self._encode(self.codec_params, jnp.asarray(waves))
    mean, std = np.asarray(post.mean), np.asarray(post.std)  # (B, 2, N, C)
    examples = []
    for i, clip in enumerate(clips):
      ex = {'id': clip.id, 'caption': clip.caption, 'duration_s': np.float32(duration),
            'latent_mean': mean[i], 'latent_std': std[i]}
      ex.update({k: v[i] for k, v in feats.items() if k != 'pe_f' or spec.pe_f})
      if spec.audio:
        ex.update(audio=waves[i], sample_rate=np.int32(self.codec_cfg.sample_rate))
      if spec.metadata_frames:
        meta = self.metadata(clip, spec.metadata_frames)
        ex['source_azimuth_deg'] = meta['source_azimuth_deg']
        if spec.camera_yaw:
          ex['camera_yaw_deg'] = meta['camera_yaw_deg']
      examples.append(ex)
    return examples


def usable_clips(clips: Iterable[ClipSource], duration_s: float) -> tuple[list[ClipSource], dict[str, str]]:
  """Probe every clip: (usable clips in manifest order, {id: reason} for the skipped ones)."""
  usable, skipped = [], {}
  for clip in clips:
    reason = probe(clip, duration_s)
    if reason is None:
      usable.append(clip)
    else:
      skipped[clip.id] = reason
      logging.warning('skipping %s: %s', clip.id, reason)
  return usable, skipped


def extract_split(config, manifest: str, out_dir: str, split: str, *, with_audio: bool | None = None,
          examples_per_shard: int = 256, batch: int = 8, storage_dtype: str = 'float32') -> dict:
  """Probe, extract and shard one split; returns a summary (also written next to the shards)."""
  start = time.perf_counter()
  extractor = Extractor(config)
  clips = read_manifest(manifest)
  usable, skipped = usable_clips(clips, extractor.net.duration_s)
  if not usable:
    raise ValueError(f'{manifest}: no usable clips ({len(skipped)} skipped: {collections.Counter(skipped.values())})')
  with_metadata = all(c.metadata for c in usable)
  spec = ShardSpec.from_network(extractor.net, with_audio=split != 'train' if with_audio is None else with_audio,
                                with_metadata=with_metadata, camera_yaw=with_metadata, storage_dtype=storage_dtype)
  cache: dict[int, dict] = {}
  progress = tqdm(total=len(usable), desc=f'extract {split}', unit='clip')

  def example(i: int) -> dict:
    if i not in cache:  # compute the whole batch holding i (write_split asks in index order)
      cache.clear()
      first = i - i % batch
      for j, ex in enumerate(extractor(usable[first:first + batch], spec), first):
        cache[j] = ex
      progress.update(len(cache))
    return cache[i]

  paths = shards.write_split(out_dir, split, spec, example, len(usable), examples_per_shard)
  progress.close()
  summary = {'split': split, 'manifest': str(manifest), 'clips': len(clips), 'examples': len(usable),
             'shards': [p.name for p in paths], 'skipped': skipped,
             'skipped_by_reason': collections.Counter(r.split(' (')[0] for r in skipped.values()),
             'spec': json.loads(spec.to_json()), 'seconds': round(time.perf_counter() - start, 1)}
  files.write_bytes(pathlib.Path(out_dir) / f'{split}.skipped.json', json.dumps(summary, indent=1).encode(), durable=True)
  return summary
