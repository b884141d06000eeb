"""Evaluation speed: seconds for `evaluate_arrays` on a set of stereo clips (default 100 x 8 s at 44.1 kHz),
every metric and all four baselines, the mel_stats quality embedder, on the current device.

  python bench/eval.py                                  # 100 clips x 8 s at 44.1 kHz, batches of 8
  python bench/eval.py --batch_size=32 --repeats=3      # accelerator numbers

The clips are synthetic binaural scenes (noise bursts moving along random azimuth tracks, rendered
with the spherical head model); the "generated" set is another render of the same scenes with other
noise and a few degrees of direction error. Cold = the first call (resampling, compilation and all);
warm = the median of `repeats` further calls. Prints a table and writes JSON (default
bench/results/eval_<device>.json).
"""
from __future__ import annotations

import json
import pathlib
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from visaudio_jax.data.binaural import render_binaural
from visaudio_jax.eval.metrics import evaluate_arrays

_CLIPS = flags.DEFINE_integer('clips', 100, 'Stereo clips per set.')
_SECONDS = flags.DEFINE_float('seconds', 8.0, 'Clip length.')
_RATE = flags.DEFINE_integer('sample_rate', 44100, 'Sample rate of the clips (resampled to 16 kHz for analysis).')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Clips per evaluation batch.')
_EMBEDDERS = flags.DEFINE_list('embedders', ['mel_stats'], 'Quality embedders.')
_BASELINES = flags.DEFINE_bool('baselines', True, 'Also score the four baselines (--nobaselines: generated only).')
_REPEATS = flags.DEFINE_integer('repeats', 1, 'Timed warm calls after the cold one.')
_OUT = flags.DEFINE_string('out', None, 'JSON path (default bench/results/eval_<device>.json).')


def scenes(num: int, length: int, rate: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Reference and generated sets (num, 2, length): the same moving scenes, different noise and a
  few degrees of error in the generated directions; also the true azimuth at 64 points per clip."""
  rng = np.random.default_rng(seed)
  t = np.arange(length) / rate
  refs, gens, tracks = [], [], []
  for _ in range(num):
    start, speed, level = rng.uniform(-90, 90), rng.uniform(-20, 20), rng.uniform(0.02, 0.3)
    track = start + speed * t  # degrees, drifting
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(0.2, 2.0) * t + rng.uniform(0, 2 * np.pi))
    refs.append(render_binaural(level * envelope * rng.standard_normal(length), track, rate))
    gens.append(render_binaural(level * envelope * rng.standard_normal(length), track + rng.normal(0, 5), rate))
    tracks.append(track[((np.arange(64) + 0.5) * length / 64).astype(int)])
  return np.stack(gens), np.stack(refs), np.stack(tracks)


def main(argv):
  del argv
  device = jax.devices()[0]
  suffix = '' if _BASELINES.value else '_nobaselines'
  out = pathlib.Path(_OUT.value or f'bench/results/eval_{device.platform}{suffix}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  length = int(_SECONDS.value * _RATE.value)
  start = time.perf_counter()
  generated, reference, azimuth = scenes(_CLIPS.value, length, _RATE.value, seed=0)
  render_s = time.perf_counter() - start

  def run():
    return evaluate_arrays(generated, reference, _RATE.value, source_azimuth_deg=azimuth,
                           embedders=_EMBEDDERS.value, baselines=_BASELINES.value, batch_size=_BATCH.value)

  # Not timing.median_seconds: the cold call (compilation included) is one of the numbers here.
  start = time.perf_counter()
  metrics = run()
  cold_s = time.perf_counter() - start
  warm = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    run()
    warm.append(time.perf_counter() - start)
  warm_s = statistics.median(warm) if warm else float('nan')
  audio_s = _CLIPS.value * _SECONDS.value
  row = {'clips': _CLIPS.value, 'clip_s': _SECONDS.value, 'sample_rate': _RATE.value, 'batch_size': _BATCH.value,
         'embedders': ','.join(_EMBEDDERS.value), 'baselines': _BASELINES.value, 'cold_s': cold_s, 'warm_s': warm_s,
         'clips_per_s': _CLIPS.value / warm_s, 'x_realtime': audio_s / warm_s, 'render_s': render_s}
  cols = list(row)
  print(f'device: {device.device_kind} ({device.platform}), jax {jax.__version__}')
  print(' | '.join(f'{c:>12}' for c in cols))
  print(' | '.join(f'{v:>12.3f}' if isinstance(v, float) else f'{v!s:>12}' for v in row.values()))
  m = metrics['metrics']
  print('sanity (generated / mono): ' + ', '.join(
      f'{k} {m[k]["generated"]:.3g} / {m[k]["mono"]}' for k in ('ild_mae', 'itd_mae', 'direction_ild')))
  out.write_text(json.dumps({'device': device.device_kind, 'platform': device.platform, 'jax': jax.__version__,
                             'rows': [row]}, indent=2))
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
