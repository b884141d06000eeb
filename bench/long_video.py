"""Any length, measured: a long BiAudio-mini clip through a trained run in overlapping windows, and
the same clip with naive concatenation, scored at the window seams (visaudio_jax/eval/seams.py).

  python bench/long_video.py --checkpoint=runs/tiny --seconds=20 --clips=4 --out=out/long_video

Renders `--clips` clips of `--seconds` (the run's BiAudio-mini scene, seeded), writes their videos
(exactly seconds x fps frames), samples each with sample.py's command (windows inpainted over their
overlaps, then cross-faded), naively (the same windows drawn independently, hard cuts at the overlap
middles) and the two halves of that difference. Prints and writes JSON: the output durations and, per
variant, spectral flux and ILD jump at the seams beside every other frame boundary, pooled over the
clips. Not a test: it needs a trained run.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

import jax
import numpy as np
from absl import app, flags

from visaudio_jax.audio.wav import read_wav, write_wav
from visaudio_jax.data import synthetic
from visaudio_jax.encoders.video import write_video
from visaudio_jax.eval.seams import seam_scores
from visaudio_jax.files import write_json
from visaudio_jax.sample import command, inputs
from visaudio_jax.sample.media import probe_video
from visaudio_jax.sample.pipeline import Pipeline

_CKPT = flags.DEFINE_string('checkpoint', 'runs/tiny', 'A train.py run directory (its EMA is sampled).')
_SECONDS = flags.DEFINE_float('seconds', 20.0, 'Length of the rendered clip.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the first clip and its sampling noise (clip i: seed + i).')
_CLIPS = flags.DEFINE_integer('clips', 4, 'Clips to render and pool the seam statistics over.')
_OUT = flags.DEFINE_string('out', 'out/long_video', 'Folder for the clip, both outputs and long_video.json.')


def render(config, seconds: float, seed: int, out: pathlib.Path) -> tuple[pathlib.Path, str]:
  """One clip of the run's BiAudio-mini scene, `seconds` long -> (video path, caption)."""
  syn = config.data.synthetic
  scene = synthetic.SyntheticConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                                       for k, v in syn.scene.items()}, duration_s=(seconds, seconds))
  clip = synthetic.make_clip(scene, synthetic.clip_rng(seed, 'long', 0))
  fps = clip.metadata['fps']
  video = out / 'long_000000.mp4'
  write_video(video, clip.frames[:round(seconds * fps)], fps)  # make_clip adds one frame past the end
  write_wav(out / 'long_000000_reference.wav', clip.wave, clip.metadata['sample_rate'])
  return video, clip.metadata['caption']


def centres(plan) -> list[int]:
  """Sample positions of the overlap middles (where a hard cut goes; the cross-fade's midpoint)."""
  return [(plan.starts[k] + plan.overlap(k) // 2) * plan.samples_per_latent for k in range(1, plan.num_windows)]


def hard_cut(result) -> np.ndarray:
  """The windows of a Result joined by hard cuts at the overlap middles instead of cross-fades."""
  plan, spl = result.job.plan, result.job.plan.samples_per_latent
  cuts = centres(plan) + [plan.num_samples]
  pieces, begin = [], 0
  for k, wave in enumerate(result.window_waves):
    pieces.append(wave[:, begin - plan.starts[k] * spl:cuts[k] - plan.starts[k] * spl])
    begin = cuts[k]
  return np.concatenate(pieces, axis=1)


def variants(pipe: Pipeline, video: pathlib.Path, caption: str, seed: int, release_t: float) -> dict[str, np.ndarray]:
  """The clip joined four ways: windowed (overlaps inpainted, cross-faded: sample.py), naive (windows
  drawn independently, hard cuts) and the two halves of the difference."""
  out = {}
  for conditioned in (True, False):
    pipe.sampler.release_t = release_t if conditioned else 0.0  # 0: the constraint is never on
    (result,) = pipe.generate([pipe.video_job('clip', video, caption)], seed, batch=1)
    name = 'inpainted' if conditioned else 'independent'
    out[f'{name}+crossfade'], out[f'{name}+hard_cut'] = result.wave, hard_cut(result)
  pipe.sampler.release_t = release_t
  return out


VARIANTS = {'windowed': 'inpainted+crossfade', 'naive': 'independent+hard_cut',
            'inpainted, hard cut': 'inpainted+hard_cut', 'independent, cross-faded': 'independent+crossfade'}


def main(argv):
  del argv
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  pipe = Pipeline.from_checkpoint(_CKPT.value)
  pooled = {name: [] for name in VARIANTS.values()}
  clips = []
  for i in range(_CLIPS.value):
    seed = _SEED.value + i
    clip_dir = out / f'clip_{i}'
    clip_dir.mkdir(exist_ok=True)
    video, caption = render(pipe.config, _SECONDS.value, seed, clip_dir)
    info = probe_video(video)
    start = time.perf_counter()
    summary = command.run(pipe, [inputs.Item('long_000000', str(video), caption)], str(clip_dir / 'windowed'),
                          seed=seed, batch=1, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    wave, rate = read_wav(clip_dir / 'windowed' / 'long_000000.wav')
    muxed = probe_video(clip_dir / 'windowed' / 'long_000000.mp4')
    plan = pipe.plan(info.duration_s)
    for name, joined in variants(pipe, video, caption, seed, pipe.options.release_t).items():
      pooled[name].append((joined, centres(plan)))
      write_wav(clip_dir / f'{name}.wav', joined, rate)
    clips.append({'seed': seed, 'caption': caption, 'video_duration_s': info.duration_s,
                  'wav_samples': int(wave.shape[-1]), 'wav_duration_s': wave.shape[-1] / rate,
                  'mp4_duration_s': muxed.duration_s, 'mp4_audio_streams': muxed.audio_streams,
                  'windows': plan.num_windows, 'starts': list(plan.starts), 'sample_seconds': round(seconds, 2),
                  'status': summary['clips'][0]['status']})
    print(json.dumps({k: v for k, v in clips[-1].items() if k not in ('starts', 'caption')}))
  result = {'checkpoint': _CKPT.value, 'seconds': _SECONDS.value, 'release_t': pipe.options.release_t,
            'window_s': pipe.window_s, 'device': jax.devices()[0].device_kind, 'clips': clips,
            'scores': {label: seam_scores(pooled[name]) for label, name in VARIANTS.items()}}
  write_json(out / 'long_video.json', result)
  keys = ('flux_seam', 'flux_other', 'flux_ratio', 'flux_z', 'ild_jump_seam', 'ild_jump_other', 'ild_jump_ratio',
          'ild_jump_z')
  print(f'{sum(c["windows"] - 1 for c in clips)} seams over {len(clips)} clips')
  print(f'{"statistic":<16}' + ''.join(f'{label:>26}' for label in VARIANTS))
  for key in keys:
    cells = [result['scores'][label][key] for label in VARIANTS]
    print(f'{key:<16}' + ''.join(f'{"-" if c is None else format(c, ".3f"):>26}' for c in cells))
  print(f'wrote {out / "long_video.json"}')


if __name__ == '__main__':
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  app.run(main)
