"""WAV files in and out (libsndfile via soundfile): channels-first arrays, atomic writes."""
from __future__ import annotations

import os

import numpy as np
import soundfile

from visaudio_jax.files import atomic_path


def write_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int, subtype: str = 'PCM_16') -> None:
  """wave (channels, samples) in [-1, 1] -> `path`; written to a temp file and renamed, so a
  failure never leaves a partial file under the final name."""
  wave = np.asarray(wave)
  if wave.ndim != 2 or not np.isfinite(wave).all():
    raise ValueError(f'{path}: expected finite audio shaped (channels, samples), got shape {wave.shape}')
  with atomic_path(path) as tmp:
    soundfile.write(tmp, np.clip(wave, -1.0, 1.0).T, sample_rate, subtype=subtype, format='WAV')


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
  """`path` -> (float32 (channels, samples), sample_rate)."""
  try:
    data, rate = soundfile.read(path, dtype='float32', always_2d=True)
  except (soundfile.LibsndfileError, RuntimeError) as exc:
    raise ValueError(f'{path}: cannot read audio ({exc})') from exc
  return data.T, rate
