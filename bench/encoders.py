"""Conditioning-encoder speed: seconds and TFLOP per clip for CLIP (image, text), Synchformer and
the Perception Encoder, full size with random weights, from uint8 360p frames (resize included).

  python bench/encoders.py                          # one 8 s clip, all encoders, float32
  python bench/encoders.py --fraction=0.125         # CPU: time 1/8 of the frames, scale up
  python bench/encoders.py --preset=tiny --dtype=bfloat16

Prints a table and writes JSON (default bench/results/encoders_<device>.json). With --fraction < 1
each encoder runs on that share of the clip's frames (segments) and the per-clip seconds are scaled
up linearly (frames are independent): the JSON marks such rows `extrapolated`. FLOPs are XLA's
cost analysis of the compiled call, scaled the same way.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from timing import median_seconds

from visaudio_jax.encoders import features

_PRESET = flags.DEFINE_string('preset', 'mmaudio', 'Encoders preset (visaudio_jax/encoders/features.py).')
_SECONDS = flags.DEFINE_float('seconds', 8.0, 'Clip length.')
_FRACTION = flags.DEFINE_float('fraction', 1.0, 'Share of the clip to run (then scaled up).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls after one warm-up call.')
_OUT = flags.DEFINE_string('out', None, 'JSON path (default bench/results/encoders_<device>.json).')


def main(argv):
  del argv
  cfg = features.encoders_config(_PRESET.value)
  dtype = jnp.dtype(_DTYPE.value)
  params = jax.tree.map(lambda x: x.astype(dtype), features.init_encoders(cfg))
  device = jax.devices()[0]
  rng = np.random.default_rng(0)
  seconds, fraction = _SECONDS.value, _FRACTION.value
  frame_counts = {s: int(cfg.fps(s) * seconds) for s in cfg.streams}
  # Synchformer works in 16-frame segments with stride 8: run whole segments.
  segments = (frame_counts['sync'] - 16) // 8 + 1
  run_counts = {s: max(1, math.ceil(n * fraction)) for s, n in frame_counts.items()}
  run_segments = max(1, math.ceil(segments * fraction))
  run_counts['sync'] = 16 + 8 * (run_segments - 1)
  scales = {s: frame_counts[s] / run_counts[s] for s in cfg.streams}
  scales['sync'] = segments / run_segments
  frames = {s: jnp.asarray(rng.integers(0, 256, (1, run_counts[s], 360, 640, 3), np.uint8)) for s in cfg.streams}
  calls = {s: (features.STREAM_FEATURES[s], frames[s]) for s in cfg.streams}
  tokens = jnp.zeros((1, cfg.clip.context_length), jnp.int32)
  calls['text'] = (features.text_features, tokens)
  scales['text'] = 1.0
  out = pathlib.Path(_OUT.value or f'bench/results/encoders_{device.platform}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  cols = ['encoder', 'frames', 'run_frames', 'seconds_per_clip', 'tflop_per_clip', 'tflops_per_s', 'compile_s']
  print(f'device: {device.device_kind} ({device.platform}), jax {jax.__version__}, preset {_PRESET.value}, '
        f'{seconds} s clip, {_DTYPE.value}')
  print(' | '.join(f'{c:>16}' for c in cols), flush=True)
  rows = []
  for name, (fn, x) in calls.items():
    p = params['clip' if name == 'text' else name]
    start = time.perf_counter()
    compiled = fn.lower(cfg, p, x).compile()
    compile_s = time.perf_counter() - start
    secs = median_seconds(compiled, p, x, repeats=_REPEATS.value) * scales[name]
    flop = (compiled.cost_analysis() or {}).get('flops', float('nan')) * scales[name]
    rows.append({'encoder': name, 'frames': frame_counts.get(name, cfg.clip.context_length),
                 'run_frames': int(x.shape[1]), 'seconds_per_clip': secs, 'tflop_per_clip': flop / 1e12,
                 'tflops_per_s': flop / secs / 1e12, 'compile_s': compile_s,
                 'extrapolated': scales[name] != 1.0, 'dtype': _DTYPE.value,
                 'config': str(dataclasses.asdict(getattr(cfg, 'clip' if name == 'text' else name)))})
    print(' | '.join(f'{rows[-1][c]:>16.4f}' if isinstance(rows[-1][c], float) else f'{rows[-1][c]!s:>16}'
                     for c in cols), flush=True)
    out.write_text(json.dumps({'device': device.device_kind, 'platform': device.platform, 'jax': jax.__version__,
                               'preset': _PRESET.value, 'clip_s': seconds, 'rows': rows}, indent=2))
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
