"""Flow-network speed and memory: forward and forward+backward (flow-matching loss) per config.

  python bench/network.py --presets=small_16k --batch=2            # CPU numbers in the issue note
  python bench/network.py --presets=small_16k,large_44k --flags=bf16 --batch=8 --repeats=10

Prints a table and writes JSON (default bench/results/network_<device>.json). Fresh random params
(timings do not depend on values). FLOPs are analytic (visaudio_jax/model/flops.py; matches
torch.utils.flop_counter on MMAudio to 1%); training FLOPs are taken as 3x forward.
"""
from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import configs
from timing import median_seconds

from visaudio_jax.convert import mmaudio
from visaudio_jax.model import flow_matching as fm
from visaudio_jax.model.config import network_config
from visaudio_jax.model.flops import network_flops
from visaudio_jax.model.network import FlowNetwork, feature_shapes

_PRESETS = flags.DEFINE_list('presets', ['tiny', 'small_16k'], 'Presets to measure.')
_FLAGS = flags.DEFINE_string('flags', '', 'Config flags (mono, bf16, scan, remat, ...), as in configs/*.py:ARG.')
_BATCH = flags.DEFINE_integer('batch', 2, 'Batch size.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls after one warm-up call.')
_OUT = flags.DEFINE_string('out', None, 'JSON path (default bench/results/network_<device>.json).')


def _memory(compiled) -> float:
  """Peak bytes XLA plans for the call: arguments + outputs + temporaries (aliasing ignored)."""
  m = compiled.memory_analysis()
  if m is None:
    return float('nan')
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**30


def measure(preset: str) -> dict:
  config = configs.get_config(preset, _FLAGS.value or None)
  cfg = network_config(config.model)
  params = nn.meta.unbox(mmaudio.init_params(cfg))
  model = FlowNetwork(cfg)
  b = _BATCH.value
  rng = np.random.default_rng(0)
  feats = {k: jnp.asarray(rng.standard_normal((b,) + s), jnp.float32) for k, s in feature_shapes(cfg).items()}
  latent = feats.pop('latent')
  t = jnp.linspace(0.1, 0.9, b)
  batch = feats | {'latent_mean': latent, 'latent_std': jnp.ones_like(latent) * 0.1}

  forward = jax.jit(lambda p, x, t, f: model.apply(p, x, t, **f))
  grad = jax.jit(jax.grad(lambda p, bt: fm.training_loss(model, p, bt, jax.random.key(0))[0]))
  fwd_c = forward.lower(params, latent, t, feats).compile()
  grad_c = grad.lower(params, batch).compile()
  fwd_s = median_seconds(fwd_c, params, latent, t, feats, repeats=_REPEATS.value)
  grad_s = median_seconds(grad_c, params, batch, repeats=_REPEATS.value)
  flops = network_flops(cfg, b)
  fwd_flops = flops['preprocess_conditions'] + flops['predict_flow']
  return {
      'preset': preset, 'flags': _FLAGS.value, 'batch': b, 'channels': cfg.channels, 'dtype': cfg.dtype,
      'params_M': sum(np.size(x) for x in jax.tree.leaves(params)) / 1e6,
      'seq': {'latent': cfg.seq_lens().latent, 'clip': cfg.seq_lens().clip, 'text': cfg.seq_lens().text},
      'forward_ms': fwd_s * 1e3, 'fwd_bwd_ms': grad_s * 1e3,
      'forward_gflop': fwd_flops / 1e9, 'fwd_bwd_gflop': 3 * fwd_flops / 1e9,
      'forward_tflops_per_s': fwd_flops / fwd_s / 1e12, 'fwd_bwd_tflops_per_s': 3 * fwd_flops / grad_s / 1e12,
      'forward_mem_gib': _memory(fwd_c), 'fwd_bwd_mem_gib': _memory(grad_c),
      'xla_forward_gflop': (fwd_c.cost_analysis() or {}).get('flops', float('nan')) / 1e9,
  }


def main(argv):
  del argv
  device = jax.devices()[0]
  rows = [measure(p) for p in _PRESETS.value]
  cols = ['preset', 'batch', 'channels', 'dtype', 'params_M', 'forward_ms', 'fwd_bwd_ms', 'forward_gflop',
          'forward_tflops_per_s', 'fwd_bwd_tflops_per_s', 'forward_mem_gib', 'fwd_bwd_mem_gib']
  print(f'device: {device.device_kind} ({device.platform}), jax {jax.__version__}')
  print(' | '.join(f'{c:>12}' for c in cols))
  for r in rows:
    print(' | '.join(f'{r[c]:>12.3f}' if isinstance(r[c], float) else f'{r[c]!s:>12}' for c in cols))
  out = pathlib.Path(_OUT.value or f'bench/results/network_{device.platform}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'device': device.device_kind, 'platform': device.platform,
                             'jax': jax.__version__, 'rows': rows}, indent=2))
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
