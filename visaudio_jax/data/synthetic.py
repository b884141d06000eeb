"""BiAudio-mini: procedurally generated video + binaural audio clips with the true source directions,
the embedded default dataset (command line: `data_prep/synthetic.py`; the CPU demo's data step:
`ensure_demo_data`).

Each clip: a small perspective video (64x64, 25 fps, 90 deg field of view) of one or two coloured
shapes moving over a world-anchored landscape, each making a class-specific sound whose loudness
pattern is also shown as the shape's brightness (beeps and drum hits flash), an optional off-screen
sound, and an optional camera pan (piecewise-linear yaw). The binaural track is rendered from each
source's head-relative azimuth with `visaudio_jax.data.binaural` (spherical head, or a SOFA HRTF).

Geometry: head = camera; azimuth 0 = the view axis, +90 = left (the SOFA convention). A source at
world azimuth w appears at head-relative azimuth w - yaw, in pixel column (W / 2)(1 - tan(az) / tan(fov / 2))
(pinhole projection: the left frame edge is +fov/2). Elevation is ignored: sounds are rendered on the
horizontal plane whatever the shape's row.

Files per split: `<out>/<split>/<id>.mp4` (duration * fps + 1 frames: frame k shows time k / fps, the
last one the end instant), `<id>.wav` (stereo PCM16, peak-normalised), `<id>.json` (caption, labels,
camera yaw and every source's azimuth per video frame) and `manifest.jsonl`
(one line per clip: id, video, wav, metadata paths relative to the split folder, caption, duration).
Every clip is a pure function of (seed, split, index): same seed, same wav and json bytes.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import pathlib
import time
import zlib
from collections.abc import Callable, Sequence

import jax
import numpy as np
import scipy.signal
from jax.experimental import multihost_utils

from visaudio_jax import files
from visaudio_jax.audio.wav import write_wav
from visaudio_jax.data import binaural
from visaudio_jax.data.extraction import extract_split
from visaudio_jax.encoders.video import write_video


@dataclasses.dataclass(frozen=True)
class SoundClass:
  name: str  # the caption's adjective or noun phrase
  shape: str | None  # None: an off-screen class
  colour: tuple[int, int, int] = (0, 0, 0)
  colour_name: str = ''


# Label ids are positions in this tuple: append, never reorder.
CLASSES = (
    SoundClass('beeping', 'square', (235, 45, 45), 'red'),
    SoundClass('humming', 'circle', (50, 90, 245), 'blue'),
    SoundClass('hissing', 'triangle', (40, 220, 70), 'green'),
    SoundClass('drumming', 'diamond', (250, 215, 30), 'yellow'),
    SoundClass('whistling', 'ring', (230, 60, 230), 'magenta'),
    SoundClass('a low rumble', None),
    SoundClass('birds chirping', None),
)
CLASS_IDS = {c.name: i for i, c in enumerate(CLASSES)}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  duration_s: tuple[float, float] = (2.0, 4.0)  # uniform per clip, rounded to whole video frames
  sample_rate: int = 16000
  fps: int = 25
  size: int = 64  # frames are size x size
  fov_deg: float = 90.0
  num_objects: tuple[int, int] = (1, 2)  # visible sounding objects per clip, inclusive range
  classes: tuple[str, ...] = ('beeping', 'humming', 'hissing', 'drumming', 'whistling')
  offscreen_classes: tuple[str, ...] = ('a low rumble', 'birds chirping')
  offscreen_prob: float = 0.3
  world_static_prob: float = 0.3  # an object fixed in the world moves on screen only when the camera turns
  camera_turn_prob: float = 0.5
  max_yaw_rate: float = 30.0  # deg/s per segment of the two-segment yaw track
  peak: float = 0.89  # -1 dBFS after normalisation

  def __post_init__(self):
    for name in self.classes + self.offscreen_classes:
      if name not in CLASS_IDS:
        raise ValueError(f'unknown sound class {name!r}; known: {list(CLASS_IDS)}')
    if any(CLASSES[CLASS_IDS[n]].shape is None for n in self.classes):
      raise ValueError(f'classes must be visible ones, got {self.classes}')
    if not 1 <= self.num_objects[0] <= self.num_objects[1] <= len(self.classes):
      raise ValueError(f'num_objects {self.num_objects} must lie in [1, {len(self.classes)}]')


@dataclasses.dataclass(frozen=True)
class Clip:
  frames: np.ndarray  # uint8 (T, H, W, 3)
  wave: np.ndarray  # float32 (2, L)
  metadata: dict


# ---------------------------------------------------------------------------------------------- sounds


def _ramp_gate(on: np.ndarray, sample_rate: int, ramp_s: float = 0.005) -> np.ndarray:
  """Boolean (L,) -> float envelope with raised-cosine ramps, so gated sounds do not click."""
  n = max(1, round(ramp_s * sample_rate))
  kernel = np.hanning(2 * n + 1)
  return np.convolve(on.astype(np.float64), kernel / kernel.sum(), mode='same')


def _periodic_gate(rng: np.random.Generator, t: np.ndarray, rate: float, duty: float) -> np.ndarray:
  return (t * rate + rng.uniform()) % 1.0 < duty


def _segments_gate(rng: np.random.Generator, t: np.ndarray, on_s: tuple[float, float],
                   off_s: tuple[float, float]) -> np.ndarray:
  """Random on/off segments, starting on."""
  edges, now, state = [], 0.0, True
  while now < t[-1]:
    now += rng.uniform(*(on_s if state else off_s))
    edges.append(now)
    state = not state
  return np.searchsorted(np.asarray(edges), t, side='right') % 2 == 0


def _decays(t: np.ndarray, onsets: np.ndarray, decay_s: float) -> np.ndarray:
  since = t[:, None] - onsets[None, :]  # (L, hits)
  return np.where(since >= 0, np.exp(-np.maximum(since, 0) / decay_s), 0.0).sum(-1)


def _onsets(rng: np.random.Generator, duration_s: float, rate: float) -> np.ndarray:
  """About `rate` onsets per second, jittered by up to 10 % of the period."""
  onsets = np.arange(rng.uniform(0, 1 / rate), duration_s, 1 / rate)
  return onsets + rng.uniform(-0.1, 0.1, onsets.shape) / rate


def _harmonics(t: np.ndarray, f0: float, amplitudes: Sequence[float], sample_rate: int) -> np.ndarray:
  return sum(a * np.sin(2 * np.pi * k * f0 * t) for k, a in enumerate(amplitudes, 1) if k * f0 < 0.45 * sample_rate)


def _synthesize(name: str, rng: np.random.Generator, num_samples: int, sr: int) -> tuple[np.ndarray, np.ndarray]:
  """(mono (L,), envelope (L,) in [0, 1]): the sound of one class and the loudness pattern the video shows."""
  t = np.arange(num_samples) / sr
  if name == 'beeping':
    env = _ramp_gate(_periodic_gate(rng, t, rng.uniform(2.5, 5.0), 0.5), sr)
    return _harmonics(t, rng.uniform(600, 1200), (1.0, 0.4, 0.2, 0.1), sr) * env, env
  if name == 'humming':
    env = 0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * t + rng.uniform(0, 2 * np.pi))
    return _harmonics(t, rng.uniform(90, 180), [1 / k for k in range(1, 40)], sr) * env, env
  if name == 'hissing':
    env = _ramp_gate(_segments_gate(rng, t, (0.4, 1.0), (0.1, 0.3)), sr, 0.01)
    return rng.standard_normal(num_samples) * env, env
  if name == 'drumming':
    onsets = _onsets(rng, t[-1], rng.uniform(1.5, 3.5))
    body = rng.standard_normal(num_samples) * 0.6 + np.sin(2 * np.pi * rng.uniform(60, 100) * t)
    return body * _decays(t, onsets, rng.uniform(0.04, 0.08)), np.minimum(_decays(t, onsets, 0.1), 1.0)
  if name == 'whistling':
    env = _ramp_gate(_periodic_gate(rng, t, rng.uniform(0.7, 1.5), 0.7), sr, 0.02)
    freq = rng.uniform(1500, 2500) + rng.uniform(200, 500) * np.sin(2 * np.pi * rng.uniform(3, 6) * t)
    phase = 2 * np.pi * np.cumsum(freq) / sr
    return (np.sin(phase) + 0.3 * np.sin(2 * phase)) * env, env
  if name == 'a low rumble':
    env = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 2 * np.pi))
    sos = scipy.signal.butter(4, 250, 'low', fs=sr, output='sos')
    return scipy.signal.sosfilt(sos, rng.standard_normal(num_samples)) * env, env
  if name == 'birds chirping':
    onsets = _onsets(rng, t[-1], rng.uniform(3.0, 6.0))
    since = t[:, None] - onsets[None, :]  # (L, chirps): 60 ms down-sweeps from 4-6 kHz
    chirp = np.sin(2 * np.pi * (rng.uniform(4000, 6000) * since - 15000 * since**2)) * np.sin(np.pi * since / 0.06)**2
    sound = np.where((since >= 0) & (since < 0.06), chirp, 0.0).sum(-1)
    return sound, np.minimum(_decays(t, onsets, 0.06), 1.0)
  raise ValueError(f'unknown sound class {name!r}')


# ---------------------------------------------------------------------------------------------- geometry


@dataclasses.dataclass(frozen=True)
class _Source:
  """A sound source fixed to (w0 + v t) in world azimuth; head-relative azimuth = world - camera yaw."""
  cls: SoundClass
  world0: float
  velocity: float  # deg/s
  gain_db: float
  row: float  # pixel row of the shape's centre (on-screen sources)
  radius: float  # pixels


def _yaw_track(rng: np.random.Generator, config: SyntheticConfig, duration: float) -> tuple[np.ndarray, np.ndarray]:
  """Knot times and yaws of the camera: constant, or two linear segments with random rates."""
  times = np.array([0.0, rng.uniform(0.3, 0.7) * duration, duration])
  rates = rng.uniform(-config.max_yaw_rate, config.max_yaw_rate, 2)
  if rng.uniform() >= config.camera_turn_prob:
    rates = np.zeros(2)
  return times, rng.uniform(-180, 180) + np.concatenate([[0.0], np.cumsum(rates * np.diff(times))])


def _relative(source: _Source, yaw: Callable[[np.ndarray], np.ndarray], t: np.ndarray) -> np.ndarray:
  return binaural.wrap_degrees(source.world0 + source.velocity * t - yaw(t))


def _column(azimuth: np.ndarray, config: SyntheticConfig) -> np.ndarray:
  """Head-relative azimuth -> pixel column of the pinhole projection (continuous; +fov/2 is the left edge)."""
  tan = np.tan(np.deg2rad(np.clip(azimuth, -89.0, 89.0))) / math.tan(math.radians(config.fov_deg / 2))
  return config.size / 2 * (1 - tan)


def _side(azimuth: float) -> str:
  return 'center' if abs(azimuth) <= 15 else 'left' if azimuth > 0 else 'right'


# ---------------------------------------------------------------------------------------------- drawing


def _sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Signed distance in pixels (negative inside) of a shape of size r centred at the origin (y down)."""
  if shape == 'square':
    return np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * r
  if shape == 'circle':
    return np.hypot(dx, dy) - r
  if shape == 'diamond':
    return (np.abs(dx) + np.abs(dy) - 1.2 * r) / math.sqrt(2)
  if shape == 'ring':
    return np.abs(np.hypot(dx, dy) - 0.75 * r) - 0.3 * r
  if shape == 'triangle':  # equilateral, apex up (Inigo Quilez's exact SDF)
    k = math.sqrt(3)
    px, py = np.abs(dx) - r, -dy + r / k
    flip = px + k * py > 0
    px, py = np.where(flip, (px - k * py) / 2, px), np.where(flip, (-k * px - py) / 2, py)
    px = px - np.clip(px, -2 * r, 0)
    return -np.hypot(px, py) * np.sign(py)
  raise ValueError(f'unknown shape {shape!r}')


def _background(rng: np.random.Generator, yaw_deg: np.ndarray, config: SyntheticConfig) -> np.ndarray:
  """(T,) yaw -> float (T, H, W, 3): muted sky and hills anchored to world azimuth, so pans are visible."""
  size = config.size
  x = (np.arange(size) + 0.5) / size * 2 - 1
  column_az = np.arctan(-x * math.tan(math.radians(config.fov_deg / 2)))  # radians, +left
  world = np.deg2rad(yaw_deg)[:, None] + column_az[None, :]  # (T, W)
  p = rng.uniform(0, 2 * np.pi, 4)
  horizon = size * (0.5 + 0.07 * np.sin(3 * world + p[0]) + 0.04 * np.sin(7 * world + p[1])
                    + 0.02 * np.sin(13 * world + p[2]))  # (T, W) rows
  rows = np.arange(size)[None, :, None] + 0.5  # (1, H, 1)
  sky, ground = rng.uniform(90, 150, 3), rng.uniform(50, 100, 3)
  stripes = 0.8 + 0.2 * (np.sin(20 * world + p[3]) > 0)  # (T, W)
  is_sky = (rows < horizon[:, None, :])[..., None]  # (T, H, W, 1)
  sky_shade = (0.85 + 0.15 * rows / size)[..., None]
  return np.where(is_sky, sky * sky_shade, ground * stripes[:, None, :, None])


# ---------------------------------------------------------------------------------------------- clips


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """Every clip has its own stream: clips are independent of build order and of each other."""
  return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _rounded(values: np.ndarray, digits: int = 3) -> list[float]:
  return [round(float(v), digits) for v in values]


def make_clip(config: SyntheticConfig, rng: np.random.Generator, hrtf: binaural.HRTF | None = None) -> Clip:
  """One random clip, in memory: frames, binaural wave and metadata (without file names)."""
  hrtf = binaural.SphericalHead() if hrtf is None else hrtf
  # The video holds one frame more than the audio's duration, at t = duration: readers that step a
  # float time grid (MMAudio's) can land just past the last frame time and would come up one short.
  duration = round(rng.uniform(*config.duration_s) * config.fps) / config.fps
  num_samples = round(duration * config.sample_rate)
  num_frames = round(duration * config.fps) + 1
  t_audio = np.arange(num_samples) / config.sample_rate
  t_video = np.arange(num_frames) / config.fps
  knots, yaws = _yaw_track(rng, config, duration)

  def yaw(t):
    return np.interp(t, knots, yaws)

  yaw_change = yaws[-1] - yaws[0]

  edge = 0.8 * config.fov_deg / 2
  sources = []
  count = rng.integers(config.num_objects[0], config.num_objects[1] + 1)
  for name in rng.choice(config.classes, count, replace=False):
    start, end = rng.uniform(-edge, edge, 2)
    static = rng.uniform() < config.world_static_prob
    velocity = 0.0 if static else (end - start + yaw_change) / duration  # ends at `end` on screen
    radius = rng.uniform(5, 8) * config.size / 64
    sources.append(_Source(CLASSES[CLASS_IDS[name]], yaws[0] + start, velocity, rng.uniform(-6, 0),
                           rng.uniform(0.3, 0.75) * config.size, radius))
  if config.offscreen_classes and rng.uniform() < config.offscreen_prob:
    azimuth = rng.choice([-1, 1]) * rng.uniform(60, 150)
    sources.append(_Source(CLASSES[CLASS_IDS[rng.choice(config.offscreen_classes)]], yaws[0] + azimuth, 0.0,
                           rng.uniform(-14, -8), 0.0, 0.0))

  frames = _background(rng, yaw(t_video), config)
  rows = np.arange(config.size)[None, :, None] + 0.5
  cols = np.arange(config.size)[None, None, :] + 0.5
  frame_starts = np.minimum(np.round(t_video * config.sample_rate).astype(int), num_samples - 1)
  wave = np.zeros((2, num_samples))
  described, unseen, tracks = [], [], []
  for source in sources:
    mono, envelope = _synthesize(source.cls.name, rng, num_samples, config.sample_rate)
    mono = mono / (np.sqrt(np.mean(mono**2)) + 1e-12) * 10 ** (source.gain_db / 20)
    wave += binaural.render_binaural(mono, _relative(source, yaw, t_audio), config.sample_rate, hrtf)
    azimuth = _relative(source, yaw, t_video)  # (T,)
    track = {'class': source.cls.name, 'label': CLASS_IDS[source.cls.name], 'on_screen': source.cls.shape is not None,
             'gain_db': round(source.gain_db, 3), 'azimuth_deg': _rounded(azimuth),
             'world_azimuth_deg': _rounded(source.world0 + source.velocity * t_video)}
    if source.cls.shape is None:
      where = 'behind' if abs(azimuth[0]) >= 150 else f'on the {_side(azimuth[0])}'
      unseen.append(f'{source.cls.name} {where}')
    else:
      column = _column(azimuth, config)
      alpha = np.clip(0.5 - _sdf(source.cls.shape, cols - column[:, None, None], rows - source.row, source.radius),
                      0, 1)
      alpha = alpha * (np.abs(azimuth) < 89)[:, None, None]  # (T, H, W): nothing drawn behind the camera
      cue = np.maximum.reduceat(envelope, frame_starts)  # (T,) loudest moment of each frame
      colour = np.asarray(source.cls.colour) * (0.35 + 0.65 * cue)[:, None, None, None]
      frames = frames * (1 - alpha[..., None]) + colour * alpha[..., None]
      in_frame = alpha.reshape(num_frames, -1).max(-1) > 0.5
      start, end = _side(azimuth[0]), _side(azimuth[-1])
      motion = f'stays {"in" if start == "center" else "on"} the {start}' if start == end else \
          f'moves from {start} to {end}'
      described.append(f'a {source.cls.name} {source.cls.colour_name} {source.cls.shape} {motion}')
      track.update(shape=source.cls.shape, colour=list(source.cls.colour), row_px=round(source.row, 3),
                   column_px=_rounded(column), in_frame=[bool(v) for v in in_frame])
    tracks.append(track)
  wave *= config.peak / max(np.abs(wave).max(), 1e-9)

  caption = f'Visible sound: {", and ".join(described)}. Invisible sound: {", and ".join(unseen) or "none"}.'
  if abs(yaw_change) > 10:
    caption += f' The camera turns {"left" if yaw_change > 0 else "right"}.'
  metadata = {
      'caption': caption, 'duration_s': duration, 'fps': config.fps, 'sample_rate': config.sample_rate,
      'num_frames': num_frames, 'num_samples': num_samples, 'size': config.size, 'fov_deg': config.fov_deg,
      'hrtf': getattr(hrtf, 'name', '') or type(hrtf).__name__,
      'azimuth_convention': 'degrees, +90 = left; azimuth_deg head-relative in (-180, 180], 0 = ahead; '
                            'camera_yaw_deg and world_azimuth_deg unwrapped world angles; one value per frame k / fps',
      'labels': [t['class'] for t in tracks], 'label_ids': [t['label'] for t in tracks],
      'camera_yaw_deg': _rounded(yaw(t_video)), 'sources': tracks,
  }
  return Clip(np.clip(np.round(frames), 0, 255).astype(np.uint8), wave.astype(np.float32), metadata)


def write_clip(clip: Clip, directory: str | os.PathLike, clip_id: str) -> dict:
  """Clip -> <id>.mp4, <id>.wav, <id>.json in `directory`; returns its manifest entry."""
  directory = pathlib.Path(directory)
  names = {'video': f'{clip_id}.mp4', 'wav': f'{clip_id}.wav', 'metadata': f'{clip_id}.json'}
  with files.atomic_path(directory / names['video']) as tmp:  # keeps the suffix: PyAV picks the muxer by it
    write_video(tmp, clip.frames, clip.metadata['fps'])
  write_wav(directory / names['wav'], clip.wave, clip.metadata['sample_rate'])
  text = json.dumps({'id': clip_id, **clip.metadata}, sort_keys=True) + '\n'
  files.write_text(directory / names['metadata'], text)
  return {'id': clip_id, **names, 'caption': clip.metadata['caption'], 'duration_s': clip.metadata['duration_s']}


def _render(config: SyntheticConfig, seed: int, split: str, index: int, hrtf: binaural.HRTF | None,
            directory: pathlib.Path) -> dict:
  return write_clip(make_clip(config, clip_rng(seed, split, index), hrtf), directory, f'{split}_{index:06d}')


def build_split(out_dir: str | os.PathLike, split: str, num_clips: int, config: SyntheticConfig, seed: int,
                hrtf: binaural.HRTF | None = None, workers: int = 1) -> list[dict]:
  """Writes `num_clips` clips and `manifest.jsonl` under <out_dir>/<split>; returns the manifest entries.
  With `workers` > 1 clips render in that many spawned processes (each clip is a pure function of
  (seed, split, index), so the files do not depend on it; spawned, as the caller may hold JAX's threads)."""
  directory = pathlib.Path(out_dir) / split
  directory.mkdir(parents=True, exist_ok=True)
  render = functools.partial(_render, config, seed, split, hrtf=hrtf, directory=directory)
  if workers > 1 and num_clips > 1:
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(min(workers, num_clips), mp_context=context) as pool:
      entries = list(pool.map(render, range(num_clips), chunksize=8))
  else:
    entries = [render(i) for i in range(num_clips)]
  text = ''.join(json.dumps(e, sort_keys=True) + '\n' for e in entries)
  files.write_text(directory / 'manifest.jsonl', text)
  return entries


def build(out: str | os.PathLike, sizes: dict[str, int], config: SyntheticConfig, seed: int,
          hrtf: binaural.HRTF | None = None, shards: str | os.PathLike | None = None,
          experiment=None, workers: int | None = None) -> None:
  """Render every split of `sizes` under `out`; with `shards`, also extract them into feature
  shards (<shards>/<split>/) with the seeded encoders and codec of `experiment` (a config), so the
  demo runs the same pipeline as real data."""
  start = time.perf_counter()
  for split, count in sizes.items():
    build_split(out, split, count, config, seed, hrtf, workers or os.cpu_count() or 1)
  seconds = time.perf_counter() - start
  total = sum(sizes.values())
  print(f'wrote {total} clips ({sizes}) to {out} in {seconds:.1f} s ({total / seconds:.2f} clips/s)')
  if shards:
    for split in sizes:
      summary = extract_split(experiment, pathlib.Path(out) / split / 'manifest.jsonl',
                              pathlib.Path(shards) / split, split)
      print(f"{split}: {summary['examples']} examples in {len(summary['shards'])} shards, "
            f"{len(summary['skipped'])} skipped, {summary['seconds']} s")


def split_sizes(num_clips: int) -> dict[str, int]:
  """A total split 80/10/10 into train/valid/test."""
  held_out = max(1, num_clips // 10)
  return {'train': num_clips - 2 * held_out, 'valid': held_out, 'test': held_out}


def ensure_demo_data(config) -> bool:
  """The CPU demo's data step: renders BiAudio-mini and extracts it into `config.data.dir` when that
  holds no shards yet and `config.data.synthetic.enabled`, so `train.py --config=configs/tiny.py`
  needs no download. Process 0 builds, every process waits for it; returns whether the data was built now."""
  spec = pathlib.Path(config.data.dir, config.data.train_split, 'spec.json')
  if spec.exists() or not config.data.synthetic.enabled:
    return False
  if jax.process_index() == 0:
    syn = config.data.synthetic
    scene = SyntheticConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in syn.scene.items()})
    print(f'building BiAudio-mini ({syn.num_clips} clips) into {config.data.dir}')
    build(syn.clips_dir, split_sizes(syn.num_clips), scene, syn.seed, shards=config.data.dir, experiment=config)
  multihost_utils.sync_global_devices('synthetic data ready')
  return True
