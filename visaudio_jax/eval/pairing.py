"""Pairing generated audio files with their references, for evaluation from files.

Generated WAV/FLAC files are matched by stem = clip id to a reference folder of WAVs or a shard
directory with audio (`data/schema.py`; a dataset root with one shard folder per split works too).
Every mismatch (missing, unmatched, duplicated, unreadable, wrong channel count, other rate or
length, too short) is reported in `Pairs.mismatches` instead of failing; only zero matched pairs raise.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from visaudio_jax.audio.wav import read_wav
from visaudio_jax.data import schema, shards
from visaudio_jax.data.loader import ShardDataSource
from visaudio_jax.eval.quality import resample

__all__ = ['Pairs', 'load_pairs']

AUDIO_SUFFIXES = ('.wav', '.flac')


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
  nested = reference / (split or 'test')
  if not (reference / schema.SPEC_FILE).exists() and (nested / schema.SPEC_FILE).exists():
    return nested
  return reference


def _reference_clips(reference: Path, split: str | None, mismatches: dict):
  """(number of clips, iterator of (id, load, azimuth (T,) or None)), load() -> (audio (C, L), rate).
  A WAV folder's files are read only when `load` is called (for matched ids)."""
  if (reference / schema.SPEC_FILE).exists():
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
  shard = (reference / schema.SPEC_FILE).exists()
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

