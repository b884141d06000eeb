"""Evaluation of generated binaural audio against references: every metric beside its sanity baselines.

`evaluate_arrays` is a pure function of arrays (the trainer calls it in memory): generated and
reference clips (K, 2, L) of the same videos -> a JSON-able dict with, for each metric, the value of
the generated set and of the four §4.9 baselines scored against the same references:
  reference  the reference itself (must be perfect: 0 error, correlation 1, ...),
  swapped    left and right exchanged (interaural cues flip sign),
  mono       the downmix (L + R) / 2 on both ears (no interaural cue at all),
  random     another clip's reference (a seeded derangement over the whole set).
A spatial metric under which `mono` beats a good system is a bug (`spec/spatial_metrics.md` §0.4);
`mono_beats_generated` lists the metrics where it beats *this* generated set.

Metrics (`visaudio_jax.eval.spatial` and `.quality`):
  paired       per clip, then nanmean: gated ILD (broadband, > 1.5 kHz), GCC-PHAT ITD and its
               coverage, BEWO clip ITD MSE, IACC, L/R balance correlation and MAE, side/mid error;
  fairplay     per clip: STFT, ENV, Mag, phase distance, SNR (mono-to-binaural literature);
  balance      BiasSkill over the set (needs clips >= `bias_window`, K >= 2);
  distribution ILD / ITD Wasserstein-1 over pooled gated frames, Fréchet distance of DSP spatial
               feature vectors (set-level: blind to pairing, so `random` scores like `reference`);
  quality      per embedder, per ear and averaged: Fréchet distance (set-level) and KL (paired);
  direction    with true source azimuths (K, T): share of lateral frames (|lateral angle| >
               `direction_min_lateral_deg`, active in the reference and the scored clip) whose ILD /
               ITD points to the true side beyond a dead zone.
Audio is resampled (soxr_hq) to `config.sample_rate` (16 kHz by default, the spec's common front end)
for the spatial metrics and to each embedder's own rate for the quality metrics. Clips are processed
in fixed-size batches (the last one padded), so memory stays bounded and each shape compiles once.
The baselines depend on the references only: `baselines=False` scores just the generated set (a
fifth of the work) for repeated evaluation of one set during training.

`evaluate` does the same for files: generated WAV/FLAC files matched by stem to a reference folder of
WAVs or a shard directory with audio (`data/schema.py`), reporting every mismatch instead of failing,
and writes metrics.json, report.md and PNG plots to an output folder.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from visaudio_jax.audio.wav import read_wav
from visaudio_jax.data.tfrecord import write_atomic
from visaudio_jax.eval import quality
from visaudio_jax.eval import spatial as sp
from visaudio_jax.eval.quality import Embedder, resample

__all__ = ['SYSTEMS', 'BASELINES', 'MetricInfo', 'metric_info', 'min_samples', 'evaluate_arrays', 'Pairs',
           'load_pairs', 'write_outputs', 'evaluate']

SYSTEMS = ('generated', 'reference', 'swapped', 'mono', 'random')
BASELINES = SYSTEMS[1:]
AUDIO_SUFFIXES = ('.wav', '.flac')


@dataclasses.dataclass(frozen=True)
class MetricInfo:
  group: str
  better: str | None  # 'lower', 'higher', or None (informative)
  unit: str
  doc: str


_INFO = {
    'ild_mae': MetricInfo('paired', 'lower', 'dB', 'broadband ILD error over reference-active frames'),
    'ild_high_mae': MetricInfo('paired', 'lower', 'dB', 'ILD error above 1.5 kHz'),
    'itd_mae': MetricInfo('paired', 'lower', 'ms', 'GCC-PHAT ITD error over frames confident in both'),
    'itd_coverage': MetricInfo('paired', 'higher', 'share', 'share of reference-active frames with a usable ITD'),
    'itd_clip_mse': MetricInfo('paired', 'lower', 'ms^2 x 1e3', "BEWO's clip-mean ITD MSE (gameable; never alone)"),
    'iacc_mae': MetricInfo('paired', 'lower', '', 'interaural cross-correlation error'),
    'balance_corr': MetricInfo('paired', 'higher', 'r', 'Pearson r of the L/R energy balance over time'),
    'balance_mae': MetricInfo('paired', 'lower', '', 'L/R energy balance error'),
    'smr_error': MetricInfo('paired', 'lower', 'dB', 'side-to-mid energy ratio error'),
    'fp_stft': MetricInfo('fairplay', 'lower', '', 'FAIR-Play STFT distance'),
    'fp_env': MetricInfo('fairplay', 'lower', '', 'FAIR-Play envelope distance'),
    'fp_mag': MetricInfo('fairplay', 'lower', '', 'magnitude distance (2 x STFT)'),
    'fp_phase': MetricInfo('fairplay', 'lower', 'rad', 'phase distance of L - R'),
    'fp_snr': MetricInfo('fairplay', 'higher', 'dB', 'waveform SNR (capped for a perfect match)'),
    'bias_skill': MetricInfo('balance', 'higher', 'fraction', 'WorldSonus BiasSkill (x100 for %)'),
    'bias_a_bal': MetricInfo('balance', 'higher', 'share', 'balanced side recall of lateral 1-s windows'),
    'bias_a_left': MetricInfo('balance', 'higher', 'share', 'recall of left-dominant windows'),
    'bias_a_right': MetricInfo('balance', 'higher', 'share', 'recall of right-dominant windows'),
    'bias_null': MetricInfo('balance', None, 'share', 'recall expected from random pairing'),
    'ild_w1': MetricInfo('distribution', 'lower', 'dB', 'W1 of pooled gated frame ILD'),
    'ild_high_w1': MetricInfo('distribution', 'lower', 'dB', 'W1 of pooled high-band ILD'),
    'itd_w1': MetricInfo('distribution', 'lower', 'ms', 'W1 of pooled confident frame ITD'),
    'spatial_fd': MetricInfo('distribution', 'lower', '', 'Fréchet distance of DSP spatial clip features'),
    'direction_ild': MetricInfo('direction', 'higher', 'share', 'lateral frames whose ILD points to the true side'),
    'direction_itd': MetricInfo('direction', 'higher', 'share', 'lateral frames whose ITD points to the true side'),
    'direction_frames': MetricInfo('direction', None, 'frames', 'frames counted for direction accuracy'),
}
_FAIRPLAY = ('stft', 'env', 'mag', 'phase', 'snr')
_PAIRED = ('ild_mae', 'ild_high_mae', 'itd_mae', 'itd_coverage', 'itd_clip_mse', 'iacc_mae', 'balance_corr',
           'balance_mae', 'smr_error')


def metric_info(name: str) -> MetricInfo:
  """What a metric name in the output means (quality names are built from the embedder's name)."""
  if name in _INFO:
    return _INFO[name]
  m = re.fullmatch(r'(fd|kl)_(.+?)(_left|_right)?', name)
  if m:
    kind, embedder, ear = m.groups()
    ear = {'_left': 'left ear', '_right': 'right ear', None: 'mean of the ears'}[ear]
    doc = (f'Fréchet distance of {embedder} embeddings, {ear}' if kind == 'fd'
           else f'KL(reference || generated) of {embedder} class posteriors, {ear}')
    return MetricInfo('quality', 'lower', 'nats' if kind == 'kl' else '', doc)
  if name.endswith('_clip'):
    return dataclasses.replace(metric_info(name[:-len('_clip')]), doc='per clip')
  return MetricInfo('other', None, '', '')


def _better(name: str, a: float | None, b: float | None) -> bool:
  """Whether value a is strictly better than b for metric `name` (False when either is missing)."""
  better = metric_info(name).better
  if better is None or a is None or b is None:
    return False
  return a < b if better == 'lower' else a > b


def _json_float(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def _json_list(x) -> list:
  return [_json_float(v) for v in np.asarray(x, np.float64).ravel()]


# --- the batched JAX part ---------------------------------------------------------------------------------

_FRAME_KEYS = ('ild', 'ild_high', 'itd', 'active', 'itd_valid')


@functools.partial(jax.jit, static_argnums=0)
def _batch_step(cfg: sp.SpatialConfig, variants: jax.Array, reference: jax.Array, valid: jax.Array,
                azimuth: jax.Array | None) -> tuple[dict, dict]:
  """All per-batch quantities of V scored sets (V, B, 2, L) against one reference batch (B, 2, L), and
  the reference's own frame cues and clip vectors (for the set-level metrics).

  vmapped over the sets with the reference unbatched, so the reference's features are computed once.
  `valid` (B,) masks the padding rows out of direction accuracy.
  """
  ref_feats = sp.frame_features(cfg, reference)
  ref_gate = ref_feats['active'] & valid[:, None]

  def one(x):
    feats = sp.frame_features(cfg, x)
    out = {'paired': sp.paired_metrics(cfg, x, reference), 'fairplay': sp.fairplay_metrics(cfg, x, reference),
           'frames': {k: feats[k] for k in _FRAME_KEYS}, 'clip_vector': sp.clip_feature_vector(cfg, x)}
    if azimuth is not None:
      out['direction'] = sp.direction_accuracy(cfg, x, azimuth, mask=ref_gate)
    return out

  ref_out = {'frames': {k: ref_feats[k] for k in _FRAME_KEYS}, 'clip_vector': sp.clip_feature_vector(cfg, reference)}
  return jax.vmap(one)(variants), ref_out


_wasserstein = jax.jit(sp.wasserstein_1d)
_bias_skill = jax.jit(sp.bias_skill, static_argnums=0)


def _partner(num_clips: int, seed: int) -> np.ndarray:
  """The random pairing of `spatial.sanity_baselines` for the whole set: clip i -> partner[i] != i.
  (Computed on clip indices standing in for waveforms, so it is exactly that function's derangement.)"""
  index = np.broadcast_to(np.arange(num_clips, dtype=np.float32)[:, None, None], (num_clips, 2, 1))
  return np.asarray(sp.sanity_baselines(jnp.asarray(index), seed)['random'][:, 0, 0]).astype(np.int64)


def _mono(wave: np.ndarray) -> np.ndarray:
  return np.repeat(wave.mean(1, keepdims=True), 2, axis=1)


def _to_rate(wave: np.ndarray, orig_sr: int, target_sr: int, batch_size: int) -> np.ndarray:
  """(K, C, L) resampled in batches (bounded float64 temporaries)."""
  if orig_sr == target_sr:
    return wave
  parts = [resample(wave[i:i + batch_size], orig_sr, target_sr) for i in range(0, len(wave), batch_size)]
  return np.concatenate(parts)


def min_samples(cfg: sp.SpatialConfig) -> int:
  """Shortest clip (at cfg.sample_rate) the paired metrics accept: one frame and one balance window."""
  return max(cfg.frame_length, cfg.balance_window)


def evaluate_arrays(generated: Any, reference: Any, sample_rate: int, ids: Sequence[str] | None = None,
                    source_azimuth_deg: Any = None, config: sp.SpatialConfig | None = None,
                    embedders: Sequence[str | Embedder] = ('mel_stats',), *, baselines: bool = True,
                    batch_size: int = 8, seed: int = 0, progress: bool = False) -> dict:
  """Scores generated clips (K, 2, L) against references (K, 2, L) at `sample_rate`, beside the baselines.

  source_azimuth_deg: optional (K, T) true azimuth track per clip (degrees, +90 = left), T points
  spread evenly over the clip; gives direction accuracy. config: the spatial front end (default
  `spatial.SPATIAL_16K`); audio is resampled to its rate. embedders: names (`quality.EMBEDDERS`)
  or `Embedder`s. baselines: False scores only the generated set (5x less work; the baselines depend
  on the references alone, so a trainer evaluating one fixed set needs them once). seed: the random
  pairing. Returns a JSON-able dict: 'metrics' {name: {system: value}}, 'per_clip' {name: {system:
  [K values]}}, 'info', 'mono_beats_generated', 'notes', and the set's description; NaN (nothing to
  measure) and systems not scored are None.
  """
  generated = np.asarray(generated, np.float32)
  reference = np.asarray(reference, np.float32)
  if generated.ndim != 3 or generated.shape[1] != 2 or generated.shape != reference.shape:
    raise ValueError(f'evaluate_arrays: expected generated and reference both (K, 2, L), got {generated.shape} '
                     f'and {reference.shape}')
  if not (np.isfinite(generated).all() and np.isfinite(reference).all()):
    raise ValueError('evaluate_arrays: non-finite samples')
  k = len(generated)
  if k < 1:
    raise ValueError('evaluate_arrays: no clips')
  ids = [str(i) for i in (range(k) if ids is None else ids)]
  if len(ids) != k:
    raise ValueError(f'evaluate_arrays: {len(ids)} ids for {k} clips')
  azimuth = None
  if source_azimuth_deg is not None:
    azimuth = np.asarray(source_azimuth_deg, np.float32)
    if azimuth.ndim != 2 or len(azimuth) != k or not np.isfinite(azimuth).all():
      raise ValueError(f'evaluate_arrays: source_azimuth_deg must be finite (K={k}, T), got shape {azimuth.shape}')
  cfg = config or sp.SPATIAL_16K
  embs = quality.get_embedders(embedders)
  if batch_size < 1:
    raise ValueError(f'evaluate_arrays: batch_size must be >= 1, got {batch_size}')
  bs = min(batch_size, k)
  # The scored systems: the random pairing needs two clips.
  systems = [s for s in (SYSTEMS if baselines else SYSTEMS[:1]) if s != 'random' or k >= 2]
  notes = []
  if k < 2:
    notes.append('one clip: no random pairing, BiasSkill or Fréchet distances (they need two clips or more)')
  if not baselines:
    notes.append('baselines not computed (baselines=False)')

  gen_a = _to_rate(generated, sample_rate, cfg.sample_rate, bs)
  ref_a = _to_rate(reference, sample_rate, cfg.sample_rate, bs)
  if gen_a.shape[-1] < min_samples(cfg):
    raise ValueError(f'evaluate_arrays: clips of {gen_a.shape[-1]} samples at {cfg.sample_rate} Hz; the metrics '
                     f'need at least {min_samples(cfg)} ({min_samples(cfg) / cfg.sample_rate:.3f} s)')
  partner = _partner(k, seed) if k >= 2 else np.arange(k)

  def scored(system, gen, ref, ref_all, rows):
    """The waves system `system` puts against references `ref` (rows `rows` of the set `ref_all`)."""
    if system == 'generated':
      return gen
    if system == 'reference':
      return ref
    if system == 'swapped':
      return ref[:, ::-1]
    if system == 'mono':
      return _mono(ref)
    return ref_all[partner[rows]]

  per_batch = collections.defaultdict(list)  # key -> list of (V, n, ...) arrays
  direction_hits = np.zeros((len(systems), 2))
  direction_count = np.zeros(len(systems))
  quality_feats = {e.name: collections.defaultdict(list) for e in embs}
  for start in tqdm(range(0, k, bs), desc='evaluating', unit='batch', disable=not progress):
    n = min(bs, k - start)
    idx = np.minimum(np.arange(start, start + bs), k - 1)  # the last batch padded with its last clip
    ref_b = ref_a[idx]
    variants = np.stack([scored(s, gen_a[idx], ref_b, ref_a, idx) for s in systems])
    out, ref_out = _batch_step(cfg, jnp.asarray(variants), jnp.asarray(ref_b), jnp.asarray(np.arange(bs) < n),
                               None if azimuth is None else jnp.asarray(azimuth[idx]))
    out, ref_out = jax.tree.map(np.asarray, (out, ref_out))
    for name in _PAIRED:
      per_batch[name].append(out['paired'][name][:, :n])
    for name in _FAIRPLAY:
      per_batch['fp_' + name].append(out['fairplay'][name][:, :n])
    for name in _FRAME_KEYS:
      per_batch['frames_' + name].append(out['frames'][name][:, :n])
      per_batch['ref_frames_' + name].append(ref_out['frames'][name][None, :n])
    per_batch['clip_vector'].append(out['clip_vector'][:, :n])
    per_batch['ref_clip_vector'].append(ref_out['clip_vector'][None, :n])
    if azimuth is not None:
      d = out['direction']
      count = d['count'].astype(np.float64)
      direction_count += count
      for j, cue in enumerate(('ild', 'itd')):
        direction_hits[:, j] += np.where(count > 0, np.nan_to_num(d[cue]) * count, 0.0)
        per_batch[f'direction_{cue}_clip'].append(d[f'{cue}_clip'][:, :n])
    for e in embs:  # generated, reference and the downmix in one call; the other baselines follow
      if e.sample_rate == cfg.sample_rate:
        gen_e, ref_e = gen_a[idx], ref_b
      else:
        gen_e = resample(generated[idx], sample_rate, e.sample_rate)
        ref_e = resample(reference[idx], sample_rate, e.sample_rate)
      stacked = np.concatenate([gen_e, ref_e] + ([ref_e.mean(1, keepdims=True)] if baselines else []), 1)
      feats = quality.ear_features(e, stacked, e.sample_rate)  # ears: gen L, R; ref L, R; downmix
      for key, value in feats.items():
        if value is not None:
          quality_feats[e.name][key].append(value[:n])

  cat = {key: np.concatenate(parts, axis=1) for key, parts in per_batch.items()}  # (V, K, ...)
  metrics, per_clip = {}, {}

  def put(name, values, clip=None):
    """values / clip: one entry per scored system."""
    got = dict(zip(systems, values))
    metrics[name] = {s: None if got.get(s) is None else _json_float(got[s]) for s in SYSTEMS}
    if clip is not None:
      got = dict(zip(systems, clip))
      per_clip[name] = {s: _json_list(got[s]) if s in got else [None] * k for s in SYSTEMS}

  def mean(x):
    x = np.asarray(x, np.float64)
    return float(np.mean(x[np.isfinite(x)])) if np.isfinite(x).any() else float('nan')

  for name in _PAIRED + tuple('fp_' + f for f in _FAIRPLAY):
    put(name, [mean(c) for c in cat[name]], cat[name])

  if k >= 2 and gen_a.shape[-1] >= cfg.bias_window:
    skills = [jax.tree.map(float, _bias_skill(cfg, jnp.asarray(scored(s, gen_a, ref_a, ref_a, np.arange(k))),
                                              jnp.asarray(ref_a))) for s in systems]
    for key in ('bias_skill', 'a_bal', 'a_left', 'a_right', 'null'):
      put(key if key == 'bias_skill' else 'bias_' + key, [s[key] for s in skills])
  elif k >= 2:
    notes.append(f'BiasSkill skipped: clips of {gen_a.shape[-1] / cfg.sample_rate:.2f} s are shorter than its '
                 f'{cfg.bias_window / cfg.sample_rate:.2f}-s window')

  frames = {key: cat['frames_' + key] for key in _FRAME_KEYS}
  ref_frames = {key: cat['ref_frames_' + key][0] for key in _FRAME_KEYS}
  for name, key, mask in (('ild_w1', 'ild', 'active'), ('ild_high_w1', 'ild_high', 'active'),
                          ('itd_w1', 'itd', 'itd_valid')):
    put(name, [float(_wasserstein(frames[key][v], ref_frames[key], frames[mask][v], ref_frames[mask]))
               for v in range(len(systems))])
  if k >= 2:
    vectors, ref_vectors = np.nan_to_num(cat['clip_vector']), np.nan_to_num(cat['ref_clip_vector'][0])
    put('spatial_fd', [quality.frechet(vectors[v], ref_vectors) for v in range(len(systems))])

  for e in embs:
    # Ears of the stacked features: generated L, R; reference L, R; downmix. The swapped and random
    # baselines are the reference's own features rearranged (the embedders work per ear).
    feats = {key: np.concatenate(parts) for key, parts in quality_feats[e.name].items()}  # (K, 4 or 5, ...)

    def pick(x, system):
      return {'generated': lambda: x[:, 0:2], 'reference': lambda: x[:, 2:4], 'swapped': lambda: x[:, 3:1:-1],
              'mono': lambda: np.repeat(x[:, 4:5], 2, axis=1), 'random': lambda: x[partner, 2:4]}[system]()

    sets = {s: {key: None if feats.get(key) is None else pick(feats[key], s) for key in ('embedding', 'logits')}
            for s in set(systems) | {'reference'}}
    values = [quality.quality_metrics(e, sets[s], sets['reference']) for s in systems]
    for name in values[0]:
      clip = None
      if name == f'kl_{e.name}':
        clip = [quality.kl_per_clip(sets[s]['logits'], sets['reference']['logits']).mean(1) for s in systems]
      put(name, [v[name] for v in values], clip)

  if azimuth is not None:
    for j, cue in enumerate(('ild', 'itd')):
      acc = np.where(direction_count > 0, direction_hits[:, j] / np.maximum(direction_count, 1), np.nan)
      put(f'direction_{cue}', acc, cat[f'direction_{cue}_clip'])
    counts = dict(zip(systems, direction_count))
    metrics['direction_frames'] = {s: int(counts[s]) if s in counts else None for s in SYSTEMS}

  mono_wins = [name for name, v in metrics.items() if _better(name, v['mono'], v['generated'])]
  return {
      'num_clips': k, 'ids': ids, 'sample_rate': int(sample_rate), 'clip_seconds': generated.shape[-1] / sample_rate,
      'analysis_sample_rate': cfg.sample_rate, 'systems': list(SYSTEMS), 'seed': seed,
      'embedders': [{'name': e.name, 'sample_rate': e.sample_rate, 'description': e.description} for e in embs],
      'config': dataclasses.asdict(cfg), 'metrics': metrics, 'per_clip': per_clip,
      'info': {name: dataclasses.asdict(metric_info(name)) for name in metrics},
      'mono_beats_generated': mono_wins, 'notes': notes,
  }


# --- files: matching generated files to references ---------------------------------------------------------


@dataclasses.dataclass
class Pairs:
  """Matched clips ready for `evaluate_arrays`, and what did not match."""
  ids: list[str]
  generated: np.ndarray  # (K, 2, L)
  reference: np.ndarray  # (K, 2, L)
  sample_rate: int
  azimuth: np.ndarray | None  # (K, T)
  mismatches: dict
  source: dict


def _audio_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
  """stem -> file for the audio files of a folder (.wav before .flac), and the duplicated stems."""
  files, duplicates = {}, []
  for path in sorted(directory.iterdir(), key=lambda p: (p.suffix.lower() != '.wav', p.name)):
    if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES and not path.name.startswith('.'):
      if path.stem in files:
        duplicates.append(path.name)
      else:
        files[path.stem] = path
  return files, duplicates


def _split_folder(reference: Path, split: str | None) -> Path:
  """A dataset root with one shard folder per split (what `extract_features` and the trainer's
  BiAudio-mini write: <root>/{train,valid,test}/spec.json) -> the split's folder; anything else as is."""
  from visaudio_jax.data import schema
  nested = reference / (split or 'test')
  if not (reference / schema.SPEC_FILE).exists() and (nested / schema.SPEC_FILE).exists():
    return nested
  return reference


def _reference_clips(reference: Path, split: str | None, mismatches: dict):
  """(number of clips, iterator of (id, load, azimuth (T,) or None)), load() -> (audio (C, L), rate).
  A WAV folder's files are read only when `load` is called (for matched ids)."""
  from visaudio_jax.data import schema, shards
  if (reference / schema.SPEC_FILE).exists():
    from visaudio_jax.data.loader import ShardDataSource
    spec = schema.read_spec(reference)
    split = split or 'test'
    if not spec.audio:
      raise ValueError(f'{reference}: these shards hold no audio (ShardSpec.audio is None); evaluation needs a '
                       'split written with the waveform (with_audio=True)')
    try:
      paths = shards.shard_paths(reference, split)
    except FileNotFoundError:
      found = sorted(p.stem for p in reference.glob('*.json') if p.name != schema.SPEC_FILE)
      raise FileNotFoundError(f'{reference}: no split {split!r} (splits here: {found})') from None
    source = ShardDataSource(paths)

    def examples():
      for i in range(len(source)):
        example = schema.decode_example(spec, source[i])
        audio, rate = example['audio'], int(example['sample_rate'])
        yield example['id'], (lambda a=audio, r=rate: (a, r)), example.get('source_azimuth_deg')

    return len(source), examples()
  if not reference.is_dir():
    raise FileNotFoundError(f'{reference}: not a folder of WAV files nor a shard directory (no spec.json)')
  files, duplicates = _audio_files(reference)
  mismatches['duplicate_reference'] += duplicates
  return len(files), ((stem, (lambda p=path: read_wav(p)), None) for stem, path in files.items())


def _respread_track(track: np.ndarray, old_len: int, new_len: int) -> np.ndarray:
  """A (T,) azimuth track spread over `old_len` samples -> T points over the first `new_len` of them."""
  if new_len == old_len:
    return track
  t = len(track)
  centres = (np.arange(t) + 0.5) / t
  unwrapped = np.unwrap(np.deg2rad(np.asarray(track, np.float64)))
  return np.rad2deg(np.interp(centres * new_len / old_len, centres, unwrapped)).astype(np.float32)


def load_pairs(generated_dir: str | os.PathLike, reference: str | os.PathLike, *, reference_split: str | None = None,
               min_seconds: float = 0.25, progress: bool = True) -> Pairs:
  """Generated files (stem = clip id) matched to reference clips; mismatches reported, not raised.

  Per matched pair: unreadable or non-finite files and channel counts other than 2 are skipped; a
  generated file at another sample rate than its reference is resampled to it; a length mismatch is
  cropped to the shorter. The set then needs one rate and one length: clips are resampled to the most
  common reference rate, pairs shorter than `min_seconds` or than half the median length are dropped,
  and the rest are cropped to the shortest remaining length (azimuth tracks re-spread over it). All
  of it is listed in `mismatches`. Raises only when no pair is left, saying why.
  """
  generated_dir, reference = Path(generated_dir), Path(reference)
  reference = _split_folder(reference, reference_split)
  if not generated_dir.is_dir():
    raise FileNotFoundError(f'{generated_dir}: no such folder of generated audio')
  mismatches = collections.defaultdict(list)
  gen_files, duplicates = _audio_files(generated_dir)
  mismatches['duplicate_generated'] += duplicates
  raw = {}  # id -> (gen, gen_rate, ref, ref_rate, azimuth)
  seen = set()
  total, clips = _reference_clips(reference, reference_split, mismatches)
  for clip_id, load, azimuth in tqdm(clips, total=total, desc='loading', unit='clip', disable=not progress):
    if clip_id in seen:
      mismatches['duplicate_reference'].append(clip_id)
      continue
    seen.add(clip_id)
    if clip_id not in gen_files:
      mismatches['missing_generated'].append(clip_id)
      continue
    try:
      ref, ref_rate = load()
    except ValueError as err:
      mismatches['unreadable'].append({'id': clip_id, 'side': 'reference', 'error': str(err)})
      continue
    try:
      gen, gen_rate = read_wav(gen_files[clip_id])
    except ValueError as err:
      mismatches['unreadable'].append({'id': clip_id, 'side': 'generated', 'error': str(err)})
      continue
    if gen.shape[0] != 2 or ref.shape[0] != 2:
      mismatches['wrong_channels'].append({'id': clip_id, 'generated': int(gen.shape[0]),
                                           'reference': int(ref.shape[0])})
      continue
    if not (np.isfinite(gen).all() and np.isfinite(ref).all()):
      mismatches['non_finite'].append(clip_id)
      continue
    raw[clip_id] = (gen, gen_rate, ref, ref_rate, azimuth)
  mismatches['unmatched_generated'] = sorted(set(gen_files) - seen)
  from visaudio_jax.data.schema import SPEC_FILE
  shard = (reference / SPEC_FILE).exists()
  source = {'generated': os.fspath(generated_dir), 'reference': os.fspath(reference),
            'reference_kind': 'shards' if shard else 'wav',
            'reference_split': (reference_split or 'test') if shard else None,
            'generated_files': len(gen_files), 'reference_clips': len(seen)}
  if not raw:
    counts = {k: len(v) for k, v in mismatches.items() if v}
    raise ValueError(
        f'evaluate: no generated file matches a reference clip ({len(gen_files)} generated files in '
        f'{generated_dir}, {len(seen)} reference clips in {reference}). Files are matched by stem = clip id; '
        f'generated e.g. {sorted(gen_files)[:3]}, reference e.g. {sorted(seen)[:3]}; problems: {counts}')

  rate = collections.Counter(r[3] for r in raw.values()).most_common(1)[0][0]
  pairs = {}
  for clip_id, (gen, gen_rate, ref, ref_rate, azimuth) in raw.items():
    if gen_rate != ref_rate:
      mismatches['resampled'].append({'id': clip_id, 'side': 'generated', 'from': gen_rate, 'to': ref_rate})
      gen = resample(gen, gen_rate, ref_rate)
    if ref_rate != rate:
      mismatches['resampled'].append({'id': clip_id, 'side': 'both', 'from': ref_rate, 'to': rate})
      gen, ref = resample(gen, ref_rate, rate), resample(ref, ref_rate, rate)
    n = min(gen.shape[-1], ref.shape[-1])
    if gen.shape[-1] != ref.shape[-1]:
      mismatches['length_mismatch'].append({'id': clip_id, 'generated_s': gen.shape[-1] / rate,
                                            'reference_s': ref.shape[-1] / rate, 'cropped_to_s': n / rate})
    if azimuth is not None:
      azimuth = _respread_track(azimuth, ref.shape[-1], n)
    pairs[clip_id] = (gen[:, :n], ref[:, :n], azimuth)
  lengths = {i: p[0].shape[-1] for i, p in pairs.items()}
  floor = max(min_seconds * rate, 0.5 * float(np.median(list(lengths.values()))))
  for clip_id, n in sorted(lengths.items()):
    if n < floor:
      mismatches['too_short'].append({'id': clip_id, 'seconds': n / rate})
      del pairs[clip_id]
  if not pairs:
    raise ValueError(f'evaluate: every matched clip is shorter than {floor / rate:.3f} s: {mismatches["too_short"]}')
  common = min(p[0].shape[-1] for p in pairs.values())
  cropped = sorted(i for i, p in pairs.items() if p[0].shape[-1] > common)
  if cropped:
    mismatches['set_cropped'] = {'to_seconds': common / rate, 'ids': cropped}
  ids = sorted(pairs)
  tracks = [pairs[i][2] for i in ids]
  azimuth = None
  if all(t is not None for t in tracks):
    azimuth = np.stack([_respread_track(t, pairs[i][0].shape[-1], common) for i, t in zip(ids, tracks)])
  return Pairs(ids=ids, generated=np.stack([pairs[i][0][:, :common] for i in ids]),
               reference=np.stack([pairs[i][1][:, :common] for i in ids]), sample_rate=int(rate), azimuth=azimuth,
               mismatches={k: v for k, v in mismatches.items() if v}, source=source)


# --- outputs: metrics.json, report.md, plots ------------------------------------------------------------------

_GROUPS = (('paired', 'Paired spatial metrics (mean over clips)'),
           ('balance', 'Stereo balance (BiasSkill, over the set)'),
           ('distribution', 'Distributional spatial metrics (set vs set)'),
           ('direction', 'Direction accuracy (true source azimuth)'),
           ('quality', 'Quality metrics per ear (embedding networks)'),
           ('fairplay', 'FAIR-Play distances (waveform fidelity, mono-to-binaural literature)'))
_BASELINE_DOC = {
    'reference': 'the reference against itself: the perfect score',
    'swapped': 'reference with left and right exchanged: every cue on the wrong side',
    'mono': 'downmix (L+R)/2 on both ears: no interaural cue (a spatial metric it wins is broken)',
    'random': "another clip's reference (seeded derangement): right kind of audio, wrong scene",
}


def _set_level(name: str) -> bool:
  return metric_info(name).group == 'distribution' or name.startswith('fd_')


def _fmt(v) -> str:
  if v is None:
    return '–'
  if isinstance(v, int):
    return str(v)
  return f'{v:.4g}'


def _beaten_by(name: str, values: dict) -> list[str]:
  """Baselines scoring better than the generated set (random skipped for set-level metrics)."""
  out = []
  for b in ('swapped', 'mono', 'random'):
    if b == 'random' and _set_level(name):
      continue
    if _better(name, values.get(b), values.get('generated')):
      out.append(b)
  return out


def _safe(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:80]


def _save(fig, path: Path) -> None:
  tmp = path.with_name(f'.{path.name}.tmp')
  try:
    fig.savefig(tmp, format='png', dpi=90)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


_frame_features = jax.jit(sp.frame_features, static_argnums=0)


def _plots(metrics: dict, pairs: Pairs, out_dir: Path, cfg: sp.SpatialConfig, plot_clips: int) -> list[str]:
  """Spectrograms and ILD/ITD tracks of a few clips, per-clip metric histograms -> paths relative to out_dir."""
  from matplotlib.figure import Figure  # object API: no pyplot state, Agg canvas for savefig
  from visaudio_jax.audio import mel as mel_lib
  plot_dir = out_dir / 'plots'
  plot_dir.mkdir(parents=True, exist_ok=True)
  written = []
  k = len(pairs.ids)
  chosen = sorted(set(np.linspace(0, k - 1, min(plot_clips, k)).round().astype(int).tolist())) if plot_clips > 0 else []
  if chosen:
    gen = resample(pairs.generated[chosen], pairs.sample_rate, cfg.sample_rate)
    ref = resample(pairs.reference[chosen], pairs.sample_rate, cfg.sample_rate)
    feats = {name: jax.tree.map(np.asarray, _frame_features(cfg, jnp.asarray(x))) for name, x in
             (('generated', gen), ('reference', ref))}
    mel_cfg = mel_lib.MelConfig(sample_rate=cfg.sample_rate, n_fft=1024, hop_length=256, n_mels=80,
                                fmax=cfg.sample_rate / 2, log='log10')
    spec = {name: 20.0 * np.asarray(mel_lib.mel_spectrogram(mel_cfg, jnp.asarray(x))) for name, x in
            (('generated', gen), ('reference', ref))}  # (n, 2, T, M) dB
    seconds = gen.shape[-1] / cfg.sample_rate
    times = (np.arange(feats['reference']['ild'].shape[-1]) * cfg.hop_length + cfg.frame_length / 2) / cfg.sample_rate
    for j, i in enumerate(chosen):
      clip_id = pairs.ids[i]
      top = max(spec['generated'][j].max(), spec['reference'][j].max())
      fig = Figure(figsize=(11, 6))  # fixed margins: constrained layout costs more than the drawing
      fig.subplots_adjust(left=0.06, right=0.9, bottom=0.09, top=0.9, wspace=0.08, hspace=0.25)
      axes = fig.subplots(2, 2, sharex=True, sharey=True)
      for row, name in enumerate(('generated', 'reference')):
        for ear, ear_name in enumerate(('left', 'right')):
          ax = axes[row, ear]
          image = ax.imshow(spec[name][j, ear].T, origin='lower', aspect='auto', extent=(0, seconds, 0, mel_cfg.n_mels),
                            vmin=top - 80, vmax=top, cmap='magma')
          ax.set_title(f'{name}, {ear_name} ear')
          ax.set_ylabel('mel bin')
      for ax in axes[1]:
        ax.set_xlabel('time (s)')
      fig.colorbar(image, cax=fig.add_axes((0.92, 0.09, 0.015, 0.81)), label='dB')
      fig.suptitle(f'{clip_id}: log-mel spectrograms')
      path = plot_dir / f'spectrogram_{j:02d}_{_safe(clip_id)}.png'
      _save(fig, path)
      written.append(path.relative_to(out_dir).as_posix())

      fig = Figure(figsize=(11, 6))
      fig.subplots_adjust(left=0.08, right=0.97, bottom=0.09, top=0.92, hspace=0.12)
      axes = fig.subplots(2, 1, sharex=True)
      for ax, cue, unit, mask in ((axes[0], 'ild', 'dB', 'active'), (axes[1], 'itd', 'ms', 'itd_valid')):
        for name, style in (('reference', dict(color='black', lw=1.5)), ('generated', dict(color='tab:red', lw=1.0))):
          f = feats[name]
          ax.plot(times, np.where(f[mask][j], f[cue][j], np.nan), label=name, **style)
        ax.axhline(0.0, color='grey', lw=0.5)
        ax.set_ylabel(f'{cue.upper()} ({unit}, + = left)')
        ax.legend(loc='upper right')
      axes[1].set_xlabel('time (s)')
      fig.suptitle(f'{clip_id}: interaural cues over time (gated frames)')
      path = plot_dir / f'cues_{j:02d}_{_safe(clip_id)}.png'
      _save(fig, path)
      written.append(path.relative_to(out_dir).as_posix())

  names = [n for n in metrics['per_clip'] if any(v is not None for v in metrics['per_clip'][n]['generated'])]
  if names:
    cols = 4
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4 * cols, 3 * rows))
    fig.subplots_adjust(left=0.04, right=0.98, bottom=0.3 / rows, top=1 - 0.35 / rows, wspace=0.25,
                        hspace=0.45)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, name in zip(axes, names):
      values = {s: np.array([v for v in metrics['per_clip'][name][s] if v is not None]) for s in ('generated', 'mono',
                                                                                                   'random')}
      both = np.concatenate([v for v in values.values() if v.size])
      bins = np.histogram_bin_edges(both, bins=20) if np.ptp(both) > 0 else 10
      ax.hist(values['generated'], bins=bins, color='tab:red', alpha=0.7, label='generated')
      for s, color in (('mono', 'tab:blue'), ('random', 'tab:green')):
        if values[s].size:
          ax.hist(values[s], bins=bins, histtype='step', color=color, lw=1.5, label=s)
      better = metric_info(name).better
      ax.set_title(name + {'lower': ' (lower better)', 'higher': ' (higher better)'}.get(better, ''), fontsize=9)
    for ax in axes[len(names):]:
      ax.axis('off')
    axes[0].legend(fontsize=8)
    fig.suptitle(f'per-clip metrics over {k} clips: generated vs mono and random baselines')
    path = plot_dir / 'per_clip_distributions.png'
    _save(fig, path)
    written.append(path.relative_to(out_dir).as_posix())
  return written


def _report(metrics: dict) -> str:
  src = metrics.get('source', {})
  lines = ['# Binaural evaluation', '']
  if src:
    split = f", split `{src['reference_split']}`" if src.get('reference_split') else ''
    lines += [f"- generated: `{src['generated']}` ({src['generated_files']} files)",
              f"- reference: `{src['reference']}` ({src['reference_kind']}{split}, {src['reference_clips']} clips)"]
  lines += [f"- matched and evaluated: **{metrics['num_clips']} clips** of {metrics['clip_seconds']:.3f} s at "
            f"{metrics['sample_rate']} Hz (spatial metrics at {metrics['analysis_sample_rate']} Hz)",
            '- embedders: ' + ', '.join(f"`{e['name']}` ({e['description']})" for e in metrics['embedders']),
            '', 'Every metric is reported beside four sanity baselines scored against the same references:', '']
  lines += [f'- **{b}**: {doc}' for b, doc in _BASELINE_DOC.items()]
  lines += ['', '↓ lower is better, ↑ higher is better. "beaten by" lists baselines that score better than the '
            'generated set (random is not compared on set-level metrics, which cannot see pairing).', '']
  metric_rows = collections.defaultdict(list)
  for name in metrics['metrics']:
    metric_rows[metric_info(name).group].append(name)
  for group, title in _GROUPS:
    if not metric_rows.get(group):
      continue
    lines += [f'## {title}', '', '| metric | | unit | ' + ' | '.join(SYSTEMS) + ' | beaten by |',
              '|---|---|---|' + '---:|' * len(SYSTEMS) + '---|']
    for name in metric_rows[group]:
      values = metrics['metrics'][name]
      info = metric_info(name)
      arrow = {'lower': '↓', 'higher': '↑'}.get(info.better, '')
      cells = ' | '.join(_fmt(values.get(s)) for s in SYSTEMS)
      lines.append(f'| `{name}` | {arrow} | {info.unit} | {cells} | {", ".join(_beaten_by(name, values))} |')
    if group == 'fairplay':
      lines += ['', 'These compare waveforms sample by sample: meaningful for mono-to-binaural upmixing, not for a '
                'generative model whose content differs from the reference (there the downmix often wins).']
    if group == 'quality':
      lines += ['', 'FD is set-level (random pairing = reference = 0); KL is paired. `mel_stats` is a weight-free '
                'stand-in, not a perceptual embedding: its numbers are not comparable with published FD/KL.']
    lines.append('')
  spatial = [n for n in metrics['mono_beats_generated'] if metric_info(n).group != 'fairplay']
  lines += ['## Warnings', '']
  if spatial:
    lines.append('The mono duplicate scores better than the generated set on: ' + ', '.join(f'`{n}`' for n in spatial)
                 + '. On these the generated audio carries less correct spatial information than no cue at all.')
  else:
    lines.append('None: the generated set beats the mono duplicate on every spatial metric.')
  if metrics.get('notes'):
    lines += ['', '## Notes', ''] + [f'- {note}' for note in metrics['notes']]
  lines += ['', '## Mismatched files', '']
  mismatches = metrics.get('mismatches', {})
  if not mismatches:
    lines.append('None: every reference clip had a generated file of the same length, rate and channel count.')
  else:
    lines += ['| kind | count | examples |', '|---|---:|---|']
    for kind, items in mismatches.items():
      if isinstance(items, dict):  # set_cropped
        lines.append(f"| {kind} | {len(items['ids'])} | cropped to {items['to_seconds']:.3f} s: "
                     f"{', '.join(items['ids'][:5])} |")
        continue
      examples = [json.dumps(x, ensure_ascii=False) if isinstance(x, dict) else str(x) for x in items[:5]]
      more = f' (+{len(items) - 5} more, see metrics.json)' if len(items) > 5 else ''
      lines.append(f"| {kind} | {len(items)} | {'; '.join(examples).replace('|', '/')}{more} |")
  if metrics.get('plots'):
    lines += ['', '## Plots', '']
    lines += [f'![{Path(p).stem}]({p})' for p in metrics['plots']]
  lines += ['', '## Config', '', '```json',
            json.dumps({'spatial': metrics['config'], 'seed': metrics['seed']}, indent=1), '```', '']
  return '\n'.join(lines)


def write_outputs(metrics: dict, out_dir: str | os.PathLike, pairs: Pairs | None = None,
                  config: sp.SpatialConfig | None = None, plot_clips: int = 3) -> dict:
  """Writes plots (when `pairs` is given), report.md and metrics.json (each atomically) to `out_dir`;
  returns `metrics` with 'plots' added."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  metrics = dict(metrics, plots=_plots(metrics, pairs, out_dir, config or sp.SPATIAL_16K, plot_clips) if pairs else [])
  write_atomic(out_dir / 'report.md', _report(metrics).encode())
  write_atomic(out_dir / 'metrics.json', json.dumps(metrics, indent=1, ensure_ascii=False, allow_nan=False).encode())
  return metrics


def evaluate(generated_dir: str | os.PathLike, reference: str | os.PathLike, out_dir: str | os.PathLike, *,
             reference_split: str | None = None, config: sp.SpatialConfig | None = None,
             embedders: Sequence[str | Embedder] = ('mel_stats',), batch_size: int = 8, seed: int = 0,
             plots: bool = True, plot_clips: int = 3, progress: bool = True) -> dict:
  """Generated WAV/FLAC files (stem = clip id) vs a reference folder of WAVs or a shard directory with
  audio (split `reference_split`, default 'test'; its `source_azimuth_deg` gives direction accuracy)
  -> `out_dir`/metrics.json, report.md and, with `plots`, plots/*.png (spectrograms and cue tracks of
  `plot_clips` clips, per-clip metric histograms). Mismatches are reported (`load_pairs`); only zero
  matched pairs raise. Returns the metrics dict (as written to metrics.json)."""
  cfg = config or sp.SPATIAL_16K
  pairs = load_pairs(generated_dir, reference, reference_split=reference_split,
                     min_seconds=(min_samples(cfg) + 1) / cfg.sample_rate, progress=progress)
  metrics = evaluate_arrays(pairs.generated, pairs.reference, pairs.sample_rate, pairs.ids, pairs.azimuth, cfg,
                            embedders, batch_size=batch_size, seed=seed, progress=progress)
  metrics['source'] = pairs.source
  metrics['mismatches'] = pairs.mismatches
  return write_outputs(metrics, out_dir, pairs if plots else None, cfg, plot_clips)
