"""The trainer's evaluators: the registry, the CPU demo's acceptance arithmetic (which clips count as
clearly lateral, the clip ILD, the side-agreement share with its coin-flip rule), sampling held-out
clips in fixed-shape batches, and the demo's check with its untrained baseline."""
import ml_collections
import numpy as np
import pytest

from configs import tiny
from visaudio_jax.eval import metrics as metrics_lib
from visaudio_jax.model.network import feature_shapes
from visaudio_jax.sample.pipeline import sample_features
from visaudio_jax.sample.sampler import balanced_batch
from visaudio_jax.train import evaluators, trainer
from visaudio_jax.train import state as state_lib
from visaudio_jax.train.evaluators import side_agreement as side_lib


def test_lateral_clips_stay_far_off_the_median_plane_on_one_side():
  azimuth = np.array([
      [30.0, 25.0, 40.0],  # left throughout
      [-21.0, -45.0, -30.0],  # right throughout
      [30.0, 10.0, 30.0],  # dips near the centre
      [30.0, -30.0, 30.0],  # crosses over
      [150.0, 140.0, 155.0],  # behind on the left: lateral angle 25-40 deg
      [0.0, 0.0, 0.0],
  ])
  lateral, side = metrics_lib.lateral_sides(azimuth, 20.0)
  np.testing.assert_array_equal(lateral, [True, True, False, False, True, False])
  np.testing.assert_array_equal(side[lateral], [1, -1, 1])
  assert metrics_lib.lateral_sides(azimuth, 22.0)[0].tolist() == [True, False, False, False, True, False]


def test_clip_ild_is_the_level_difference_in_db():
  rng = np.random.default_rng(0)
  noise = rng.standard_normal(16000).astype(np.float32) * 0.1
  waves = np.stack([np.stack([noise, 0.5 * noise]), np.stack([0.5 * noise, noise]), np.zeros((2, 16000), np.float32)])
  ild = metrics_lib.clip_ild_db(waves)
  np.testing.assert_allclose(ild[:2], [20 * np.log10(2), -20 * np.log10(2)], atol=0.05)
  assert ild[2] == 0.0  # silent: no active frames, no cue


def test_side_agreement_counts_a_zero_ild_as_a_coin_flip():
  side = np.array([1, -1, 1, -1])
  assert metrics_lib.side_agreement(np.array([3.0, -2.0, 1.0, -0.5]), side) == 1.0
  assert metrics_lib.side_agreement(np.array([-3.0, 2.0, -1.0, 0.5]), side) == 0.0
  assert metrics_lib.side_agreement(np.zeros(4), side) == pytest.approx(0.5)  # mono duplicate
  assert metrics_lib.side_agreement(np.array([3.0, 2.0, 0.0, -1.0]), side) == pytest.approx(2.5 / 4)
  assert metrics_lib.side_agreement(np.zeros(0), np.zeros(0)) is None


# ---- sampling held-out clips with a micro net (2 flow steps) -------------------------------------

def _micro_program():
  config = tiny.get_config()
  config.model.update(depth=2, fused_depth=1)
  config.flow.num_steps = 2
  config.train.global_batch_size = 8
  return trainer.build(config)


def _clips(program, count: int, seed: int = 0) -> dict:
  """In-memory held-out clips: random features; reference audio louder in the ear of the true side."""
  rng = np.random.default_rng(seed)
  shapes = feature_shapes(program.net)
  clips = {k: rng.standard_normal((count,) + s).astype(np.float32) for k, s in shapes.items() if k != 'latent'}
  clips['latent_mean'] = rng.standard_normal((count,) + shapes['latent']).astype(np.float32)
  length = int(program.net.duration_s * 16000)
  azimuth = np.where(np.arange(count) % 2 == 0, 60.0, -60.0)  # left, right, left, ...
  gains = np.stack([np.where(azimuth > 0, 1.0, 0.3), np.where(azimuth > 0, 0.3, 1.0)], 1)  # (K, 2)
  clips['audio'] = (gains[..., None] * rng.standard_normal((count, 1, length))).astype(np.float32)
  clips['source_azimuth_deg'] = np.repeat(azimuth[:, None], 4, 1)
  clips['sample_rate'] = np.full(count, 16000)
  clips['id'] = np.array([f'clip_{i}' for i in range(count)])
  return clips


def test_balanced_batches_use_one_shape_and_little_padding():
  assert [balanced_batch(k) for k in (1, 8, 16, 17, 18, 33, 72)] == [1, 8, 16, 9, 9, 11, 15]


def _side_evaluator(program, workdir, **options):
  evals = ml_collections.ConfigDict({'side': dict(tiny.get_config().evals.side, **options)})
  return evaluators.from_config(evals, program, str(workdir), writer=None)['side'].evaluator


def test_held_out_sampling_is_per_clip_whatever_the_batch(tmp_path):
  """A clip's noise comes from (seed, id): padding a batch or sampling a clip alone changes nothing,
  another seed draws again, and repeated ids are refused (they would repeat the draw)."""
  program = _micro_program()
  sampler = _side_evaluator(program, tmp_path).sampler
  params = state_lib.create_state(program.net, program.config, program.tx, program.shardings, program.mesh).params
  clips = _clips(program, 3)
  full = sample_features(sampler, params, clips, seed=1, batch=3)
  alone = sample_features(sampler, params, {k: v[2:] for k, v in clips.items()}, seed=1, batch=1)
  assert full.shape == (3, 2, clips['audio'].shape[-1])
  np.testing.assert_allclose(alone[0], full[2], atol=1e-6)
  again = sample_features(sampler, params, clips, seed=2, batch=3)
  assert np.abs(again - full).max() > 1e-2
  with pytest.raises(ValueError, match='clip ids repeat'):
    sample_features(sampler, params, {k: np.concatenate([v, v]) for k, v in clips.items()}, seed=1)


@pytest.mark.integration  # the demo's whole final check: sampling, the evaluate report and its files
def test_final_scores_the_untrained_model_over_several_draws(tmp_path, monkeypatch):
  program = _micro_program()
  clips = _clips(program, 4)
  monkeypatch.setattr(side_lib, 'held_out', lambda data_dir, split, count: clips)
  evaluator = _side_evaluator(program, tmp_path, untrained_draws=3, num_clips=4)
  state = state_lib.create_state(program.net, program.config, program.tx, program.shardings, program.mesh)
  evaluator.start(state, 'from scratch')
  summary = evaluator.run(state, 40)
  assert summary['lateral_clips'] == 4
  assert summary['scored_samples'] == {'trained': 4, 'untrained': 12, 'mono_duplicate': 4, 'reference': 4}
  table = summary['ild_side_agreement']
  assert table['reference'] == 1.0 and table['mono_duplicate'] == 0.5
  assert table['untrained'] in {i / 12 for i in range(13)}
  assert (tmp_path / 'final_eval' / 'generated' / 'clip_3.wav').exists()
  assert (tmp_path / 'final_eval' / 'side_agreement.json').exists()
  assert evaluator.report(summary)[1].startswith('  trained ')
  assert '(3 noise draws per clip)' in evaluator.report(summary)[2]


def test_evaluators_are_loaded_by_name_with_their_cadence(tmp_path):
  program = _micro_program()
  evals = ml_collections.ConfigDict({
      'val': dict(type='validation_loss', every=5, final=True, split='valid', batches=1),
      'off': dict(type='validation_loss', every=0, final=False),
      'side': dict(tiny.get_config().evals.side)})
  loaded = evaluators.from_config(evals, program, str(tmp_path), writer=None)
  assert sorted(loaded) == ['side', 'val']  # 'off' never runs: not built
  assert [s for s in range(1, 16) if loaded['val'].due(s)] == [5, 10, 15] and loaded['val'].final
  assert not any(loaded['side'].due(s) for s in range(1, 100)) and loaded['side'].final
  with pytest.raises(ValueError, match=r"config.evals.bad: unknown evaluator type 'no_such'"):
    evaluators.from_config(ml_collections.ConfigDict({'bad': dict(type='no_such', every=1)}), program, '', None)
  with pytest.raises(ValueError, match=r'config.evals.val \(validation_loss\):.*unexpected keyword'):
    evaluators.from_config(ml_collections.ConfigDict({'val': dict(type='validation_loss', every=1, nmae=3)}),
                           program, '', None)
