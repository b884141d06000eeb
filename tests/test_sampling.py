"""The sampling entry point on the embedded default and from an imported MMAudio checkpoint
(tests/fixtures/mmaudio_net/tiny_v1_state.pth, see shared/fixtures/mmaudio_net/README.md)."""
import json

import numpy as np
import pytest
import safetensors.numpy

from conftest import fixture_path
from mmaudio_fixtures import tiny_config
from visaudio_jax.audio.wav import read_wav
from visaudio_jax.encoders.video import write_video
from visaudio_jax.sample import command
from configs import tiny


def test_sampling_from_imported_mmaudio_weights(tmp_path):
  config = tiny.get_config()
  fixture = tiny_config('tiny_v1')
  for key in ('latent_dim', 'clip_dim', 'sync_dim', 'text_dim', 'hidden_dim', 'depth', 'fused_depth',
              'num_heads', 'latent_seq_len', 'clip_seq_len', 'sync_seq_len', 'text_seq_len'):
    config.model[key] = getattr(fixture, key)
  config.model.duration_s = 2.0
  config.flow.num_steps = 3
  config.codec.preset = ''  # the fixture net's 10 latent channels fit no codec: latents only
  summary = command.run(config, str(tmp_path), str(fixture_path('mmaudio_net', 'tiny_v1_state.pth')))
  latents = safetensors.numpy.load_file(str(tmp_path / 'latents.safetensors'))['latents']
  assert latents.shape == (2, 2, 43, 10) and np.isfinite(latents).all()
  assert json.loads((tmp_path / 'summary.json').read_text()) == summary
  assert summary['network_evals_per_sample_batch'] == 6 and summary['params'] > 636_934


def test_sampling_writes_stereo_wavs_on_the_embedded_default(tmp_path):
  """tiny config, fresh weights: latents -> tiny mel codec (Griffin-Lim) -> one stereo WAV per item."""
  config = tiny.get_config()
  config.flow.num_steps = 2
  summary = command.run(config, str(tmp_path))
  assert summary['wav_files'] == ['sample_0.wav', 'sample_1.wav']
  wave, rate = read_wav(tmp_path / 'sample_1.wav')
  latents = safetensors.numpy.load_file(str(tmp_path / 'latents.safetensors'))['latents']
  assert rate == 16000 and wave.shape == (2, latents.shape[2] * 256)
  assert 0 < np.abs(wave).max() <= 1.0


def test_sampling_refuses_a_codec_that_does_not_fit_the_model(tmp_path):
  config = tiny.get_config()
  config.codec.preset = 'mmaudio_16k'
  with pytest.raises(ValueError, match='codec and model disagree'):
    command.run(config, str(tmp_path))


@pytest.mark.integration
def test_sampling_conditioned_on_a_video_file(tmp_path):
  """A video written here -> tiny seeded encoders -> sampler -> WAV. (A fresh MMAudio-style init has a
  zero output layer, so its latents do not depend on the conditions yet: shapes and files only.)"""
  frames = np.random.default_rng(0).integers(0, 256, (60, 48, 64, 3), np.uint8)
  write_video(tmp_path / 'clip.mp4', frames, 24)  # 2.5 s
  config = tiny.get_config()
  config.flow.num_steps = 2
  summary = command.run(config, str(tmp_path / 'out'), videos=[str(tmp_path / 'clip.mp4')], captions=['rain'])
  assert summary['batch'] == 1 and summary['wav_files'] == ['sample_0.wav'] and 'clip.mp4' in summary['features']
  latents = safetensors.numpy.load_file(str(tmp_path / 'out' / 'latents.safetensors'))['latents']
  assert latents.shape == (1, 2, 125, 32) and np.isfinite(latents).all()
  with pytest.raises(ValueError, match='1 videos but 2 captions'):
    command.run(config, str(tmp_path / 'bad'), videos=[str(tmp_path / 'clip.mp4')], captions=['a', 'b'])
