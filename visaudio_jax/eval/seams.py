"""Seams of audio generated in windows: are the joins heard? Frame-to-frame change at the seams beside
the same change everywhere else in the clip.

Two changes per boundary between consecutive analysis frames (the spatial metrics' grid: 64-ms frames,
16-ms hop, no padding): the spectral flux, the mean over both ears and all bins of |change of the
log power spectrum (dB)|, and the ILD jump, |change of the broadband ILD (dB)| where both frames are
active. A boundary belongs to a seam when its time lies within `radius` hops of the seam; the other
boundaries are those farther than one frame length from every seam. A join that is not heard has
seam changes like the others: `flux_ratio` = mean seam flux / mean other flux near 1, and `flux_z`
(the seams' mean minus the others', in standard errors of a mean of that many boundaries) within
about +-2.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from visaudio_jax.eval import spatial as sp


def boundary_changes(wave: np.ndarray, cfg: sp.SpatialConfig = sp.SPATIAL_16K) -> dict[str, np.ndarray]:
  """(2, L) at cfg.sample_rate -> per boundary (T - 1,): 'flux' (dB), 'ild_jump' (dB, NaN where a
  frame is inactive) and 'time' (samples: the midpoint between the two frames' centres)."""
  wave = np.asarray(wave, np.float64)
  t = cfg.num_frames(wave.shape[-1])
  index = np.arange(t)[:, None] * cfg.hop_length + np.arange(cfg.frame_length)[None, :]
  frames = wave[:, index] * np.hanning(cfg.frame_length + 2)[1:-1]  # (2, T, n)
  power_db = 10 * np.log10(np.maximum(np.abs(np.fft.rfft(frames, axis=-1)) ** 2, 1e-10))
  flux = np.abs(np.diff(power_db, axis=1)).mean(axis=(0, 2))
  feats = sp.jitted_frame_features(cfg, jnp.asarray(wave[None], jnp.float32))
  ild = np.asarray(feats['ild'][0], np.float64)
  active = np.asarray(feats['active'][0], bool)
  jump = np.where(active[1:] & active[:-1], np.abs(np.diff(ild)), np.nan)
  time = np.arange(t - 1) * cfg.hop_length + cfg.frame_length / 2 + cfg.hop_length / 2
  return {'flux': flux, 'ild_jump': jump, 'time': time}


def seam_scores(clips: Sequence[tuple[np.ndarray, Sequence[int]]], cfg: sp.SpatialConfig = sp.SPATIAL_16K,
                radius: int = 1) -> dict[str, float]:
  """Seam vs other boundaries, pooled over `clips`: (wave (2, L), its seams' sample positions) each."""
  pooled = {'flux': ([], []), 'ild_jump': ([], [])}
  counts = [0, 0, 0]
  for wave, seams in clips:
    changes = boundary_changes(wave, cfg)
    distance = np.min(np.abs(changes['time'][:, None] - np.asarray(seams, np.float64)[None]), axis=1)
    at_seam, other = distance <= radius * cfg.hop_length, distance > cfg.frame_length
    counts = [counts[0] + len(seams), counts[1] + int(at_seam.sum()), counts[2] + int(other.sum())]
    for name, (seam_parts, other_parts) in pooled.items():
      seam_parts.append(changes[name][at_seam])
      other_parts.append(changes[name][other])
  out = {'seams': counts[0], 'seam_boundaries': counts[1], 'other_boundaries': counts[2]}
  for name, (seam_parts, other_parts) in pooled.items():
    seam_values, other_values = np.concatenate(seam_parts), np.concatenate(other_parts)
    seam_values, other_values = seam_values[np.isfinite(seam_values)], other_values[np.isfinite(other_values)]
    if not len(seam_values) or not len(other_values):
      out.update({f'{name}_seam': None, f'{name}_other': None, f'{name}_ratio': None})
      continue
    seam_mean, other_mean = float(seam_values.mean()), float(other_values.mean())
    # How far the seams' mean lies from the others' in standard errors of a mean of that many boundaries.
    z = (seam_mean - other_mean) / (other_values.std() / np.sqrt(len(seam_values)) + 1e-12)
    out.update({f'{name}_seam': seam_mean, f'{name}_other': other_mean, f'{name}_ratio': seam_mean / max(other_mean, 1e-9),
                f'{name}_z': float(z), f'{name}_other_p95': float(np.percentile(other_values, 95))})
  return out
