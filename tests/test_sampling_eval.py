"""The CPU demo's acceptance arithmetic (`train/sampling_eval.py`): which clips count as clearly
lateral, the clip ILD, and the side-agreement share with its coin-flip rule."""
import numpy as np
import pytest

from visaudio_jax.train import sampling_eval


def test_lateral_clips_stay_far_off_the_median_plane_on_one_side():
  azimuth = np.array([
      [30.0, 25.0, 40.0],  # left throughout
      [-21.0, -45.0, -30.0],  # right throughout
      [30.0, 10.0, 30.0],  # dips near the centre
      [30.0, -30.0, 30.0],  # crosses over
      [150.0, 140.0, 155.0],  # behind on the left: lateral angle 25-40 deg
      [0.0, 0.0, 0.0],
  ])
  lateral, side = sampling_eval.lateral_sides(azimuth, 20.0)
  np.testing.assert_array_equal(lateral, [True, True, False, False, True, False])
  np.testing.assert_array_equal(side[lateral], [1, -1, 1])
  assert sampling_eval.lateral_sides(azimuth, 22.0)[0].tolist() == [True, False, False, False, True, False]


def test_clip_ild_is_the_level_difference_in_db():
  rng = np.random.default_rng(0)
  noise = rng.standard_normal(16000).astype(np.float32) * 0.1
  waves = np.stack([np.stack([noise, 0.5 * noise]), np.stack([0.5 * noise, noise]), np.zeros((2, 16000), np.float32)])
  ild = sampling_eval.clip_ild_db(waves)
  np.testing.assert_allclose(ild[:2], [20 * np.log10(2), -20 * np.log10(2)], atol=0.05)
  assert ild[2] == 0.0  # silent: no active frames, no cue


def test_side_agreement_counts_a_zero_ild_as_a_coin_flip():
  side = np.array([1, -1, 1, -1])
  assert sampling_eval.side_agreement(np.array([3.0, -2.0, 1.0, -0.5]), side) == 1.0
  assert sampling_eval.side_agreement(np.array([-3.0, 2.0, -1.0, 0.5]), side) == 0.0
  assert sampling_eval.side_agreement(np.zeros(4), side) == pytest.approx(0.5)  # mono duplicate
  assert sampling_eval.side_agreement(np.array([3.0, 2.0, 0.0, -1.0]), side) == pytest.approx(2.5 / 4)
  assert sampling_eval.side_agreement(np.zeros(0), np.zeros(0)) is None


# ---- sampling held-out clips with a micro net (2 flow steps) -------------------------------------

def _micro_program(**eval_overrides):
  from visaudio_jax.model import presets
  from visaudio_jax.train import trainer
  config = presets.experiment_config('tiny')
  config.model.update(depth=2, fused_depth=1)
  config.flow.num_steps = 2
  config.train.global_batch_size = 8
  config.eval.update(eval_overrides)
  return trainer.build(config)


def _clips(program, count: int, seed: int = 0) -> dict:
  """In-memory held-out clips: random features; reference audio louder in the ear of the true side."""
  from visaudio_jax.model.network import feature_shapes
  rng = np.random.default_rng(seed)
  shapes = feature_shapes(program.cfg)
  clips = {k: rng.standard_normal((count,) + s).astype(np.float32) for k, s in shapes.items() if k != 'latent'}
  clips['latent_mean'] = rng.standard_normal((count,) + shapes['latent']).astype(np.float32)
  length = int(program.cfg.duration_s * 16000)
  azimuth = np.where(np.arange(count) % 2 == 0, 60.0, -60.0)  # left, right, left, ...
  gains = np.stack([np.where(azimuth > 0, 1.0, 0.3), np.where(azimuth > 0, 0.3, 1.0)], 1)  # (K, 2)
  clips['audio'] = (gains[..., None] * rng.standard_normal((count, 1, length))).astype(np.float32)
  clips['source_azimuth_deg'] = np.repeat(azimuth[:, None], 4, 1)
  clips['sample_rate'] = np.full(count, 16000)
  clips['id'] = np.array([f'clip_{i}' for i in range(count)])
  return clips


def test_balanced_batches_use_one_shape_and_little_padding():
  assert [sampling_eval.balanced_batch(k) for k in (1, 8, 16, 17, 18, 33, 72)] == [1, 8, 16, 9, 9, 11, 15]


def test_generate_waves_pads_the_last_batch_and_draws_per_listing():
  """Padding the last batch changes nothing for the real clips; a clip listed twice gets two noise
  draws (the untrained baseline's repeats are independent samples)."""
  from visaudio_jax.train import state as state_lib
  program = _micro_program()
  params = state_lib.create_state(program.cfg, program.config, program.tx, program.shardings, program.mesh).params
  clips = _clips(program, 3)
  full = sampling_eval.generate_waves(program, params, clips, seed=1, batch=3)
  padded = sampling_eval.generate_waves(program, params, {k: v[:2] for k, v in clips.items()}, seed=1, batch=3)
  assert full.shape == (3, 2, clips['audio'].shape[-1])
  np.testing.assert_allclose(padded, full[:2], atol=1e-5)
  twice = sampling_eval.generate_waves(program, params, {k: np.concatenate([v, v]) for k, v in clips.items()},
                                       seed=1, batch=3)
  np.testing.assert_allclose(twice[:3], full, atol=1e-5)
  assert np.abs(twice[3:] - full).max() > 1e-2


def test_final_scores_the_untrained_model_over_several_draws(tmp_path, monkeypatch):
  from visaudio_jax.train import state as state_lib
  program = _micro_program(untrained_draws=3, final_num_samples=4)
  clips = _clips(program, 4)
  monkeypatch.setattr(sampling_eval, 'held_out', lambda config, split, count: clips)
  state = state_lib.create_state(program.cfg, program.config, program.tx, program.shardings, program.mesh)
  summary = sampling_eval.final(program, state, str(tmp_path), untrained_params=state.params)
  assert summary['lateral_clips'] == 4
  assert summary['scored_samples'] == {'trained': 4, 'untrained': 12, 'mono_duplicate': 4, 'reference': 4}
  table = summary['ild_side_agreement']
  assert table['reference'] == 1.0 and table['mono_duplicate'] == 0.5
  assert table['untrained'] in {i / 12 for i in range(13)}
  assert (tmp_path / 'final_eval' / 'generated' / 'clip_3.wav').exists()
  assert (tmp_path / 'final_eval' / 'side_agreement.json').exists()
