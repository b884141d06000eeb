"""Loading the golden tiny MMAudio nets (tests/fixtures/mmaudio_net, copied from
shared/fixtures/mmaudio_net: weights, inputs and outputs written by the original PyTorch code)."""
from __future__ import annotations

import json

import numpy as np
import safetensors.numpy

from conftest import fixture_path
from visaudio_jax.model.config import NetworkConfig
from visaudio_jax.model.tables import Tables, make_tables

TINY = ('tiny_v1', 'tiny_v2')


def tiny_config(name: str, **overrides) -> NetworkConfig:
  """The fixture's constructor kwargs as our mono config."""
  kw = json.loads(fixture_path('mmaudio_net', f'manifest_{name}.json').read_text())['constructor_kwargs_passed']
  fields = {k: kw[k] for k in ('latent_dim', 'clip_dim', 'sync_dim', 'text_dim', 'hidden_dim', 'depth',
                               'fused_depth', 'num_heads', 'mlp_ratio', 'v2', 'latent_seq_len',
                               'clip_seq_len', 'sync_seq_len', 'text_seq_len')}
  return NetworkConfig(**fields, channels=1, **overrides)


def tiny_io(name: str) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(fixture_path('mmaudio_net', f'{name}_io.safetensors')))


def torch_tables(cfg: NetworkConfig, io: dict[str, np.ndarray], prefix: str = '') -> Tables:
  """The fixture's own RoPE / timestep tables (PyTorch's float32 cos/sin/pow are not correctly
  rounded, so bit-exact parity needs its tables; ours agree to one ulp, tested separately)."""
  ours = make_tables(cfg)
  return ours._replace(latent_rot=io[f'{prefix}buffers/latent_rot'][0], clip_rot=io[f'{prefix}buffers/clip_rot'][0],
                       t_freqs=io[f'{prefix}buffers/t_embed_freqs'])


def rel_err(got, ref) -> float:
  """Frobenius norm of the difference over the norm of the reference."""
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
