"""The sampling entry point on the embedded default and from an imported MMAudio checkpoint
(tests/fixtures/mmaudio_net/tiny_v1_state.pth, see shared/fixtures/mmaudio_net/README.md)."""
import json

import numpy as np
import safetensors.numpy

from conftest import fixture_path
from mmaudio_fixtures import tiny_config
from visaudio_jax.eval import sampling
from visaudio_jax.model import presets


def test_sampling_from_imported_mmaudio_weights(tmp_path):
  config = presets.experiment_config('tiny')
  fixture = tiny_config('tiny_v1')
  for key in ('latent_dim', 'clip_dim', 'sync_dim', 'text_dim', 'hidden_dim', 'depth', 'fused_depth',
              'num_heads', 'latent_seq_len', 'clip_seq_len', 'sync_seq_len', 'text_seq_len'):
    config.model[key] = getattr(fixture, key)
  config.model.duration_s = 2.0
  config.flow.num_steps = 3
  summary = sampling.run(config, str(tmp_path), str(fixture_path('mmaudio_net', 'tiny_v1_state.pth')))
  latents = safetensors.numpy.load_file(str(tmp_path / 'latents.safetensors'))['latents']
  assert latents.shape == (2, 2, 43, 10) and np.isfinite(latents).all()
  assert json.loads((tmp_path / 'summary.json').read_text()) == summary
  assert summary['network_evals_per_sample_batch'] == 6 and summary['params'] > 636_934
