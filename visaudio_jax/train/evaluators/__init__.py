"""Evaluators the trainer runs, loaded by name from the config (big_vision's registry):

    config.evals.<name> = dict(type=<module of this package>, every=<steps, 0 = never>,
                               final=<also after the last step>, **the evaluator's own options)

Each module defines `Evaluator(program, workdir, writer, **options)` with `run(state, step) -> dict`
(numbers in it go to TensorBoard as `<name>/<key>`), and optionally `start(state, how)` (called once
the run's state exists) and `report(result) -> list[str]` (lines train.py prints after the run).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import ml_collections

from visaudio_jax.train.evaluators.common import Evaluator


@dataclasses.dataclass
class Scheduled:
  """An evaluator with its cadence."""
  evaluator: Evaluator
  every: int
  final: bool

  def due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0


def from_config(evals: ml_collections.ConfigDict, program: Any, workdir: str, writer: Any) -> dict[str, Scheduled]:
  """Every evaluator of `config.evals` that runs at all (every > 0 or final)."""
  out = {}
  for name, block in evals.items():
    options = dict(block)
    kind = options.pop('type', None)
    every, final = int(options.pop('every', 0)), bool(options.pop('final', False))
    if not every and not final:
      continue
    try:
      module = importlib.import_module(f'{__name__}.{kind}')
    except ModuleNotFoundError as e:
      raise ValueError(f'config.evals.{name}: unknown evaluator type {kind!r} (a module of {__name__})') from e
    try:
      evaluator = module.Evaluator(program, workdir, writer, **options)
    except TypeError as e:
      raise ValueError(f'config.evals.{name} ({kind}): {e}') from e
    out[name] = Scheduled(evaluator, every, final)
  return out
