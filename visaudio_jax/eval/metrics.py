"""Every metric of generated binaural audio beside its sanity baselines, from arrays in memory.

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
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from visaudio_jax.eval import quality
from visaudio_jax.eval import spatial as sp
from visaudio_jax.eval.quality import Embedder, resample

__all__ = ['SYSTEMS', 'BASELINES', 'MetricInfo', 'metric_info', 'is_better', 'min_samples', 'evaluate_arrays']

SYSTEMS = ('generated', 'reference', 'swapped', 'mono', 'random')
LATERAL_DEG = 20.0  # a clip is clearly lateral when its source stays this far off the median plane, on one side
BASELINES = SYSTEMS[1:]


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
    'side_agreement': MetricInfo('direction', 'higher', 'share', 'clearly lateral clips whose clip ILD points to '
                                 'the true side (0 dB counts 1/2)'),
    'side_clips': MetricInfo('direction', None, 'clips', f'clips >= {LATERAL_DEG:g} deg to one side throughout'),
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


def is_better(name: str, a: float | None, b: float | None) -> bool:
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


def clip_ild_db(waves: np.ndarray, cfg: sp.SpatialConfig = sp.SPATIAL_16K) -> np.ndarray:
  """(K, 2, L) -> (K,) broadband ILD in dB, mean over the clip's active frames (0 when silent)."""
  feats = sp.jitted_frame_features(cfg, jnp.asarray(waves))
  active = np.asarray(feats['active'], np.float64)
  ild = np.asarray(feats['ild'], np.float64)
  return np.where(active.sum(-1) > 0, (ild * active).sum(-1) / np.maximum(active.sum(-1), 1), 0.0)


def side_agreement(ild_db: np.ndarray, side: np.ndarray) -> float | None:
  """Share of clips whose ILD sign is the true side (+1 left, -1 right); an ILD of exactly 0 (no
  lateral cue at all, e.g. a mono duplicate) counts as a coin flip, 1/2. None without clips."""
  if not len(side):
    return None
  return float(np.mean(np.where(ild_db == 0, 0.5, np.sign(ild_db) == side)))


def lateral_sides(azimuth_deg: np.ndarray, lateral_deg: float) -> tuple[np.ndarray, np.ndarray]:
  """(K, T) source azimuths (+90 = left) -> (clearly lateral (K,) bool, side (K,) +1 left / -1 right):
  lateral when every point is at least `lateral_deg` off the median plane, all on one side (by the
  lateral angle, so a source behind counts like its mirror in front)."""
  sin_az = np.sin(np.deg2rad(azimuth_deg))
  lateral = np.all(np.abs(sin_az) >= np.sin(np.deg2rad(lateral_deg)), -1) & np.all(
      np.sign(sin_az) == np.sign(sin_az[:, :1]), -1)
  return lateral, np.sign(sin_az[:, 0])


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
    lateral, side = lateral_sides(azimuth, LATERAL_DEG)
    if lateral.any():  # the demo's check (train/evaluators/side_agreement.py), per system
      active = frames['active'].astype(np.float64)
      ild = np.where(active.sum(-1) > 0, (np.nan_to_num(frames['ild']) * active).sum(-1) / np.maximum(active.sum(-1), 1), 0.0)
      put('side_agreement', [side_agreement(ild[v][lateral], side[lateral]) for v in range(len(systems))])
      metrics['side_clips'] = {s: int(lateral.sum()) if s in systems else None for s in SYSTEMS}

  mono_wins = [name for name, v in metrics.items() if is_better(name, v['mono'], v['generated'])]
  return {
      'num_clips': k, 'ids': ids, 'sample_rate': int(sample_rate), 'clip_seconds': generated.shape[-1] / sample_rate,
      'analysis_sample_rate': cfg.sample_rate, 'systems': list(SYSTEMS), 'seed': seed,
      'embedders': [{'name': e.name, 'sample_rate': e.sample_rate, 'description': e.description} for e in embs],
      'config': dataclasses.asdict(cfg), 'metrics': metrics, 'per_clip': per_clip,
      'info': {name: dataclasses.asdict(metric_info(name)) for name in metrics},
      'mono_beats_generated': mono_wins, 'notes': notes,
  }

