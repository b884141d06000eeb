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
