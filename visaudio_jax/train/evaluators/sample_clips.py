"""Periodic sampling: held-out clips -> binaural WAVs (through the config's codec) under
<workdir>/samples/<step>/ and in TensorBoard, scored with the spatial metrics (`eval.metrics`)."""
from __future__ import annotations

import os

import jax
import numpy as np

from visaudio_jax.eval.metrics import evaluate_arrays
from visaudio_jax.sample.pipeline import sample_features
from visaudio_jax.sample.sampler import Sampler
from visaudio_jax.train.evaluators.common import Evaluator as Base
from visaudio_jax.train.evaluators.common import eval_params, held_out, write_waves


class Evaluator(Base):

  def __init__(self, program, workdir, writer, *, split: str = 'valid', num_clips: int = 8,
               ema: str = 'sigma_rel_0p05'):
    super().__init__(program, workdir, writer)
    self.split, self.num_clips, self.ema = split, int(num_clips), ema
    self.sampler = Sampler.from_config(self.config)
    self._clips = None  # read on first use: the same clips every time

  def run(self, state, step: int) -> dict[str, float]:
    if not self.sampler.makes_sound:
      return {}
    if self._clips is None:
      self._clips = held_out(self.config.data.dir, self.split, self.num_clips)
    clips = self._clips
    waves = sample_features(self.sampler, eval_params(state, self.ema), clips, seed=step)
    sr = int(clips['sample_rate'][0])
    if jax.process_index() == 0:
      write_waves(os.path.join(self.workdir, 'samples', f'{step:08d}'), clips['id'], waves, sr)
      self.writer.write_audios(step, {f'sample_{i}': np.moveaxis(w, 0, -1)[None] for i, w in enumerate(waves[:4])},
                               sample_rate=sr)
    result = evaluate_arrays(waves, clips['audio'], sr, clips['id'], clips.get('source_azimuth_deg'),
                             baselines=False)
    return {k: v['generated'] for k, v in result['metrics'].items() if v['generated'] is not None}
