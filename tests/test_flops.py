"""Analytic FLOPs against MMAudio's measured ones (spec/mmaudio.md 1.1: torch.utils.flop_counter at
batch 1, 8 s: preprocess_conditions / predict_flow in GFLOP)."""
import pytest

from test_network import load_config
from visaudio_jax.model.config import network_config
from visaudio_jax.model.flops import network_flops, sample_flops

MEASURED = {'small_16k': (4.0, 57.3), 'small_44k': (4.0, 78.4), 'medium_44k': (13.7, 306), 'large_44k': (13.7, 514)}


@pytest.mark.parametrize('preset', MEASURED)
def test_flops_match_torch_flop_counter(preset):
  cfg = network_config(load_config(preset, 'mono').model)
  got = network_flops(cfg)
  pre, flow = MEASURED[preset]
  assert got['preprocess_conditions'] / 1e9 == pytest.approx(pre, rel=0.03)
  assert got['predict_flow'] / 1e9 == pytest.approx(flow, rel=0.01)
  assert network_flops(cfg, batch=3)['predict_flow'] == 3 * got['predict_flow']


def test_binaural_costs_more_than_twice_the_latent_work():
  mono = network_config(load_config('large_44k', 'mono').model)
  binaural = network_config(load_config('large_44k').model)
  ratio = network_flops(binaural)['predict_flow'] / network_flops(mono)['predict_flow']
  assert 1.8 < ratio < 2.6  # two latent branches; shared clip/text; a longer joint attention
  assert sample_flops(mono) / 1e12 == pytest.approx(25.7, rel=0.02)  # the spec's L-44k 25-step CFG sample
