"""`sample.py`: a trained model turns videos into binaural videos.

Per clip `<out>/<id>.wav` (stereo, the model's rate) and `<out>/<id>.mp4` (the input video's stream
copied, the binaural track muxed in; `.mkv`/`.mov` for the lossless audio codecs), each written
atomically; clips whose outputs exist are skipped (an interrupted run resumes) unless `overwrite`.
`<out>/summary.json` (rewritten after every clip): the weights, the settings and per clip its
duration, windows, seconds, outputs or failure reason. With several processes each takes every
process_count-th clip and writes `summary.<index>-of-<count>.json`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from visaudio_jax.audio.wav import write_wav
from visaudio_jax.encoders.video import VideoError
from visaudio_jax.files import write_json
from visaudio_jax.sample.inputs import Item
from visaudio_jax.sample.media import AUDIO_CODECS, mux, probe_video
from visaudio_jax.sample.pipeline import Pipeline
from visaudio_jax.sample.sampler import Job

VIDEO_SUFFIX = {'aac': '.mp4', 'flac': '.mkv', 'pcm_s16le': '.mov'}


def outputs(out_dir: str, clip_id: str, audio_codec: str, with_video: bool) -> dict[str, str]:
  paths = {'wav': os.path.join(out_dir, f'{clip_id}.wav')}
  if with_video:
    paths['video_out'] = os.path.join(out_dir, clip_id + VIDEO_SUFFIX[audio_codec])
  return paths


def stand_in_items(count: int) -> list[Item]:
  """`--random_features` without videos: clips of the model's duration, no video to mux into."""
  return [Item(f'random_{i:04d}', '') for i in range(count)]


def run(pipe: Pipeline, items: list[Item], out_dir: str, *, seed: int = 0, batch: int | None = None,
        overwrite: bool = False, random_features: bool = False, progress: bool = True) -> dict[str, Any]:
  """Generates every item not yet done; returns (and writes) the summary. Failed clips are in it
  with their reason; the caller turns `summary['failed']` into the exit status."""
  codec = pipe.options.audio_codec
  if codec not in AUDIO_CODECS:
    raise ValueError(f'sample.audio_codec={codec!r}: expected one of {sorted(AUDIO_CODECS)}')
  if not pipe.sampler.makes_sound:
    raise ValueError(f'codec {pipe.config.codec.preset!r} has no weights (config.codec.vae_ckpt, '
                     'config.codec.vocoder_ckpt): it cannot make waveforms')
  os.makedirs(out_dir, exist_ok=True)
  index, count = jax.process_index(), jax.process_count()
  items = items[index::count]
  name = 'summary.json' if count == 1 else f'summary.{index}-of-{count}.json'
  rate = pipe.sampler.codec_cfg.sample_rate
  clips: dict[str, dict] = {}
  jobs: list[Job] = []
  for item in items:
    paths = outputs(out_dir, item.id, codec, bool(item.video))
    entry = clips[item.id] = {'id': item.id, 'video': item.video, 'caption': item.caption, **paths}
    if item.error:
      entry.update(status='failed', error=item.error)
      continue
    if not overwrite and all(os.path.exists(p) for p in paths.values()):
      entry['status'] = 'skipped: outputs exist (--overwrite to redo)'
      continue
    try:
      duration = probe_video(item.video).duration_s if item.video else pipe.net.duration_s
      if random_features:
        plan = pipe.plan(duration)
        jobs.append(Job(item.id, plan, lambda i=item.id, p=plan: pipe.random_features(i, p)))
      else:
        jobs.append(pipe.video_job(item.id, item.video, item.caption, duration))
    except (VideoError, ValueError) as e:
      entry.update(status='failed', error=str(e))
      continue
    entry.update(duration_s=round(duration, 6), windows=jobs[-1].plan.num_windows)
  summary = {'weights': dataclasses.asdict(pipe.weights), 'preset': pipe.config.preset,
             'features': 'seeded random stand-ins' if random_features else f'encoders {pipe.config.encoders.preset}',
             'seed': seed, 'batch': pipe.sampler.batch_size(batch or pipe.options.batch_size),
             'devices': pipe.sampler.mesh.devices.size, 'device_kind': jax.local_devices()[0].device_kind,
             'flow': {k: pipe.config.flow[k] for k in ('num_steps', 'method', 'cfg_strength')},
             'sample': dataclasses.asdict(pipe.options), 'sample_rate': rate, 'clips': list(clips.values())}

  def save(**extra):
    done = [c for c in clips.values() if 'status' in c]
    summary.update(extra, generated=sum(c['status'] == 'ok' for c in done),
                   skipped=sum(c['status'].startswith('skipped') for c in done),
                   failed=sum(c['status'] == 'failed' for c in done), pending=len(clips) - len(done))
    write_json(os.path.join(out_dir, name), summary)

  start = time.perf_counter()
  bar = tqdm(total=len(jobs), desc='clips', unit='clip', disable=not progress)
  for result in pipe.generate(jobs, seed, batch):
    entry = clips[result.job.id]
    try:
      if result.error is not None:
        raise result.error
      wave = np.asarray(result.wave)
      write_wav(entry['wav'], wave, rate)
      if 'video_out' in entry:  # a mono model's track goes to both channels
        mux(entry['video'], np.repeat(wave, 2, 0) if wave.shape[0] == 1 else wave, rate, entry['video_out'], codec)
      entry.update(status='ok', seconds=round(result.seconds, 3))
    except Exception as e:  # noqa: BLE001 -- one clip's failure is reported, the others go on
      entry.update(status='failed', error=f'{type(e).__name__}: {e}')
    bar.update(1)
    save()
  bar.close()
  save(wall_s=round(time.perf_counter() - start, 3))
  return summary
