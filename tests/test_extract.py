"""`visaudio_jax.encoders.extract` end to end with the seeded tiny encoders: a video file written
here -> PyAV decode at each encoder's rate -> resize on the device -> CLIP / Synchformer / PE /
CLIP text -> exactly the feature shapes the tiny flow network takes."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from configs import tiny as tiny_config
from visaudio_jax import encoders
from visaudio_jax.encoders.video import write_video
from visaudio_jax.model.config import network_config
from visaudio_jax.model.network import feature_shapes


@pytest.fixture(scope='module')
def tiny():
  cfg = encoders.encoders_config('tiny')
  return cfg, encoders.init_encoders(cfg, seed=0)


@pytest.fixture(scope='module')
def video(tmp_path_factory):
  rng = np.random.default_rng(0)
  frames = np.repeat(rng.integers(0, 256, (75, 9, 16, 3), np.uint8), 8, axis=1).repeat(8, axis=2)  # 72x128
  path = tmp_path_factory.mktemp('extract') / 'clip.mp4'
  write_video(path, frames, 30)  # 2.5 s
  return path


def test_extract_gives_the_tiny_networks_feature_shapes(tiny, video):
  cfg, params = tiny
  feats = encoders.extract(video, 'a dog barks on the left', cfg, params, duration_s=2.0)
  config = tiny_config.get_config()
  expected = feature_shapes(network_config(config.model))
  expected.pop('latent')
  assert {k: v.shape[1:] for k, v in feats.items()} == expected
  assert all(v.shape[0] == 1 and v.dtype == np.float32 and np.isfinite(v).all() for v in feats.values())
  np.testing.assert_allclose(np.linalg.norm(feats['clip_f'], axis=-1), 1.0, rtol=1e-5)  # L2-normalised
  np.testing.assert_allclose(np.linalg.norm(feats['text_f'], axis=-1), 1.0, rtol=1e-5)


def test_batched_extraction_equals_one_by_one(tiny, video):
  cfg, params = tiny
  frames = encoders.decode_video(video, cfg, 2.0)
  shifted = {k: np.roll(v, 1, axis=0) for k, v in frames.items()}
  both = encoders.extract([frames, shifted], ['', 'rain'], cfg, params)
  one = encoders.extract(shifted, 'rain', cfg, params)
  for key in both:
    np.testing.assert_allclose(both[key][1], one[key][0], rtol=2e-5, atol=2e-6)
  assert not np.allclose(both['sync_f'][0], both['sync_f'][1])  # different inputs, different features


def test_seeded_encoders_are_deterministic(tiny):
  cfg, params = tiny
  again = encoders.init_encoders(cfg, seed=0)
  other = encoders.init_encoders(cfg, seed=1)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, again)))
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, params, other)))


def test_extract_input_errors(tiny, video):
  cfg, params = tiny
  with pytest.raises(ValueError, match='duration_s is needed'):
    encoders.extract(video, '', cfg, params)
  with pytest.raises(ValueError, match='2 videos but 1 captions'):
    encoders.extract([video, video], [''], cfg, params, duration_s=1.0)
  frames = encoders.decode_video(video, cfg, 2.0)
  with pytest.raises(ValueError, match=r"lacks streams \['pe'\]"):
    encoders.extract({k: v for k, v in frames.items() if k != 'pe'}, '', cfg, params)
  with pytest.raises(ValueError, match='must be uint8'):
    encoders.extract(dict(frames, clip=frames['clip'].astype(np.float32)), '', cfg, params)
  no_pe = dataclasses.replace(cfg, pe=None)
  assert 'pe_f' not in encoders.extract(frames, '', no_pe, params)
