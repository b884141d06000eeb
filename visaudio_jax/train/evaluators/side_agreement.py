"""The CPU demo's check: on held-out clips whose true source stays clearly on one side, the share
whose generated broadband ILD points to that side, beside the untrained net, a mono duplicate of the
reference and the reference itself; plus the full `evaluate` report of the trained net's clips in
<workdir>/final_eval/.

The untrained net is scored over `untrained_draws` noise draws per clip: its zero-initialised output
layer makes it return its noise, so its ILD sign is a coin flip per draw (one draw on ~18 clips ranged
28-83 % over seeds)."""
from __future__ import annotations

import os

import jax
import numpy as np

from visaudio_jax.eval.metrics import LATERAL_DEG, clip_ild_db, evaluate_arrays, lateral_sides, side_agreement
from visaudio_jax.eval.report import write_outputs
from visaudio_jax.files import write_json
from visaudio_jax.sample.pipeline import sample_features
from visaudio_jax.sample.sampler import Sampler, balanced_batch
from visaudio_jax.train import state as state_lib
from visaudio_jax.train.evaluators.common import Evaluator as Base
from visaudio_jax.train.evaluators.common import eval_params, held_out, write_waves

SEED = 1  # the trained and untrained nets' noise


class Evaluator(Base):

  def __init__(self, program, workdir, writer, *, split: str = 'test', num_clips: int = 70,
               ema: str = 'sigma_rel_0p05', lateral_deg: float = LATERAL_DEG, lateral_only: bool = True,
               untrained_draws: int = 4):
    super().__init__(program, workdir, writer)
    self.split, self.num_clips, self.ema = split, int(num_clips), ema
    self.lateral_deg, self.lateral_only, self.untrained_draws = float(lateral_deg), bool(lateral_only), int(untrained_draws)
    self.sampler = Sampler.from_config(self.config)
    self.untrained_params = None

  def start(self, state, how: str) -> None:
    # A run from scratch starts from the untrained params: keep a host copy (re-creating them at the
    # end costs another init compile).
    if how == 'from scratch' and self.untrained_draws:
      self.untrained_params = jax.device_get(state.params)

  def _untrained(self):
    if self.untrained_params is None:
      p = self.program
      self.untrained_params = state_lib.create_state(p.net, p.config, p.tx, p.shardings, p.mesh).params
    return self.untrained_params

  def run(self, state, step: int) -> dict:
    clips = held_out(self.config.data.dir, self.split, self.num_clips)
    if 'source_azimuth_deg' not in clips:
      return {'note': f'split {self.split!r} stores no source azimuths: no side agreement'}
    if not self.sampler.makes_sound:
      return {'note': 'the codec has no weights: no waveforms to score'}
    lateral, side = lateral_sides(clips['source_azimuth_deg'], self.lateral_deg)
    num_clips = len(side)
    if self.lateral_only:  # sample (the slow part) and report only the clips scored here
      clips, side, lateral = {k: v[lateral] for k, v in clips.items()}, side[lateral], lateral[lateral]
      if not len(side):
        return {'split': self.split, 'clips': num_clips, 'lateral_clips': 0,
                'note': f'no clip is {self.lateral_deg} degrees to one side throughout'}
    sr = int(clips['sample_rate'][0])
    batch = balanced_batch(len(side))  # the untrained draws reuse the trained samples' compiled shapes
    trained = sample_features(self.sampler, eval_params(state, self.ema), clips, SEED, batch)
    reference = clips['audio']
    mono = np.repeat(reference.mean(1, keepdims=True), 2, axis=1)
    systems = {'trained': (trained[lateral], side[lateral]), 'untrained': None,
               'mono_duplicate': (mono[lateral], side[lateral]), 'reference': (reference[lateral], side[lateral])}
    draws = self.untrained_draws
    if lateral.any() and draws:  # only on the clips it is scored on: sampling is the slow part
      scored = {k: v[lateral] for k, v in clips.items()}
      untrained = [sample_features(self.sampler, self._untrained(), scored, SEED + d, batch) for d in range(draws)]
      systems['untrained'] = (np.concatenate(untrained), np.tile(side[lateral], draws))
    table = {name: None if s is None else side_agreement(clip_ild_db(s[0]), s[1]) for name, s in systems.items()}
    out_dir = os.path.join(self.workdir, 'final_eval')
    metrics = evaluate_arrays(trained, reference, sr, clips['id'], clips['source_azimuth_deg'])
    summary = {'split': self.split, 'clips': num_clips, 'lateral_clips': int(lateral.sum()),
               'ild_side_agreement': table,
               'scored_samples': {name: 0 if s is None else len(s[1]) for name, s in systems.items()},
               'direction_ild': metrics['metrics'].get('direction_ild', {}),
               'ild_mae': metrics['metrics'].get('ild_mae', {})}
    if jax.process_index() == 0:
      write_waves(os.path.join(out_dir, 'generated'), clips['id'], trained, sr)
      write_outputs(metrics, out_dir)
      write_json(os.path.join(out_dir, 'side_agreement.json'), summary)
    return summary

  def report(self, result: dict) -> list[str]:
    if 'ild_side_agreement' not in result:
      return [f'side agreement: {result.get("note", "not computed")}']
    lines = [f"ILD side agreement on {result['lateral_clips']} clearly lateral held-out clips "
             f"({result['split']} split, {result['clips']} clips):"]
    for name, value in result['ild_side_agreement'].items():
      samples = result['scored_samples'][name]
      draws = f' ({samples // result["lateral_clips"]} noise draws per clip)' if samples > result['lateral_clips'] else ''
      lines.append(f'  {name:<16} ' + ('   -' if value is None else f'{100 * value:5.1f} %  of {samples}{draws}'))
    return lines
