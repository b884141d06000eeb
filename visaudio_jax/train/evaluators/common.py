"""What the evaluators share: the base class and held-out clips."""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from visaudio_jax.audio.wav import write_wav
from visaudio_jax.data import loader


class Evaluator:
  """Base: holds the trainer's program, the workdir and the metric writer."""

  def __init__(self, program: Any, workdir: str, writer: Any):
    self.program, self.config, self.workdir, self.writer = program, program.config, workdir, writer

  def start(self, state: Any, how: str) -> None:
    """Called once the run's state exists (`how`: 'from scratch', 'resumed from step N', ...)."""

  def run(self, state: Any, step: int) -> dict:
    raise NotImplementedError

  def report(self, result: dict) -> list[str]:
    return []


def eval_params(state: Any, ema: str) -> Any:
  """The EMA called `ema` ('' = the raw params), on every process's local devices (sampling runs on
  each process's own devices; with several processes the params are gathered first)."""
  if ema and ema not in state.ema:
    raise ValueError(f'evaluator ema={ema!r}: the state has EMAs {sorted(state.ema)}')
  params = state.ema[ema] if ema else state.params
  return multihost_utils.process_allgather(params) if jax.process_count() > 1 else params


def write_waves(directory: str | os.PathLike, ids, waves: np.ndarray, sample_rate: int) -> None:
  """One stereo WAV per clip, `<directory>/<id>.wav`."""
  os.makedirs(directory, exist_ok=True)
  for clip_id, wave in zip(ids, waves):
    write_wav(os.path.join(directory, f'{clip_id}.wav'), wave, sample_rate)


def held_out(data_dir: str, split: str, count: int) -> dict[str, np.ndarray]:
  """The first `count` clips of a split with audio (unshuffled, so every evaluation sees the same)."""
  directory = os.path.join(data_dir, split)
  clips = loader.first_batches(directory, split, 1, count, num_epochs=1)
  if not clips:
    raise ValueError(f'{directory}: no clips to evaluate')
  if 'audio' not in clips[0]:
    raise ValueError(f'{directory}: split {split!r} stores no audio; extract it with --with_audio to evaluate')
  return {k: np.concatenate([c[k] for c in clips]) for k in clips[0]}
