"""Measured-HRIR anchors for the spatial metrics (spec/spatial_metrics.md: white noise through MIT
KEMAR at 45 / 90 / 270 degrees gives ITD 0.363 / 0.726 / -0.726 ms and ILD ~ +10.6 / +11.8 / -11.8 dB).
The SOFA file is tests/fixtures/hrtf/MIT_KEMAR_normal_pinna.sofa (Debian libmysofa1, see its README);
this also exercises `binaural.load_sofa` on a real SimpleFreeFieldHRIR file."""
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_path
from visaudio_jax.data import binaural
from visaudio_jax.eval import spatial

SR = 44100


@pytest.fixture(scope='module')
def kemar():
  return binaural.load_sofa(fixture_path('hrtf', 'MIT_KEMAR_normal_pinna.sofa'))


def test_kemar_file_reads_as_measured(kemar):
  assert kemar.sample_rate == SR and kemar.irs.shape == (710, 2, 512)


@pytest.mark.parametrize('azimuth,itd_ms,ild_db', [(45, 0.363, 10.6), (90, 0.726, 11.8), (-90, -0.726, -11.8),
                                                   (0, 0.0, 0.0)])
def test_white_noise_through_kemar_gives_the_anchor_cues(kemar, azimuth, itd_ms, ild_db):
  noise = np.random.default_rng(0).standard_normal(2 * SR).astype(np.float32) * 0.1
  wave = binaural.render_binaural(noise, float(azimuth), SR, hrtf=kemar)  # (2, L), +90 = left
  feats = spatial.frame_features(spatial.SpatialConfig(sample_rate=SR), jnp.asarray(wave[None]))
  active = np.asarray(feats['active'][0])
  assert active.mean() > 0.9
  itd = float(np.median(np.asarray(feats['itd'][0])[active]))
  ild = float(np.median(np.asarray(feats['ild'][0])[active]))
  assert abs(itd - itd_ms) < 0.023  # one 44.1 kHz sample
  assert abs(ild - ild_db) < 0.3
