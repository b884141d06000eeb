"""Evaluation from files: generated audio files -> pairs with references -> metrics -> outputs.

`evaluate` matches generated WAV/FLAC files by stem to a reference folder of WAVs or a shard
directory with audio (`eval/pairing.py`, reporting every mismatch instead of failing), scores them
beside the sanity baselines (`eval/metrics.py`) and writes metrics.json, report.md and PNG plots to
an output folder (`eval/report.py`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from visaudio_jax.eval import spatial as sp
from visaudio_jax.eval.metrics import evaluate_arrays, min_samples
from visaudio_jax.eval.pairing import load_pairs
from visaudio_jax.eval.quality import Embedder
from visaudio_jax.eval.report import write_outputs

__all__ = ['evaluate']


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
