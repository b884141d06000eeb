"""The training objective on fixed batches of a held-out split, with a fixed key and no condition
dropout: comparable across evaluations."""
from __future__ import annotations

import os

import jax

from visaudio_jax.data import loader
from visaudio_jax.train import metrics
from visaudio_jax.train.evaluators.common import Evaluator as Base
from visaudio_jax.train.step import BATCH_FIELDS


class Evaluator(Base):

  def __init__(self, program, workdir, writer, *, split: str = 'valid', batches: int = 4):
    super().__init__(program, workdir, writer)
    self.split, self.num_batches = split, int(batches)
    self._batches = None  # read on first use: the same batches every time

  def run(self, state, step: int) -> dict[str, float]:
    if self._batches is None:
      directory = os.path.join(self.config.data.dir, self.split)
      self._batches = loader.first_batches(directory, self.split, int(self.config.train.global_batch_size),
                                           self.num_batches)
    key = jax.random.key(0)
    history = []
    for i, batch in enumerate(self._batches):
      arrays = loader.to_global_arrays({k: batch[k] for k in BATCH_FIELDS if k in batch},
                                       self.program.batch_sharding)
      history.append(jax.device_get(self.program.validation_loss(state.params, arrays, jax.random.fold_in(key, i))))
    return metrics.summarize(history)
