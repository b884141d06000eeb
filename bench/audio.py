"""Audio codec speed: encode (wave -> mel -> VAE posterior) and decode (latent -> VAE decoder ->
mel -> vocoder) of stereo clips, both ears batched, full-size MMAudio presets with random weights.

  python bench/audio.py                                  # 8 s stereo, batch 1, 16k and 44k, float32
  python bench/audio.py --dtype=bfloat16 --batch=4       # accelerator numbers

Prints a table and writes JSON (default bench/results/audio_<device>.json). Timings do not depend
on weight values; weights are random but full size (VAE 172M / 305M, BigVGAN 112M / 122M params).
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from timing import median_seconds

from visaudio_jax.audio import codec as codec_lib

_PRESETS = flags.DEFINE_list('presets', ['mmaudio_16k', 'mmaudio_44k'], 'Codec presets to measure.')
_SECONDS = flags.DEFINE_float('seconds', 8.0, 'Clip length.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Stereo clips per call (2 x batch mono waveforms).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype of VAE and vocoder.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls after one warm-up call.')
_OUT = flags.DEFINE_string('out', None, 'JSON path (default bench/results/audio_<device>.json).')


def measure(name: str) -> dict:
  cfg = codec_lib.codec_config(name)
  dtype = jnp.dtype(_DTYPE.value)
  params = jax.jit(lambda: codec_lib.init_codec(cfg))()
  samples = int(_SECONDS.value * cfg.sample_rate) // cfg.samples_per_latent * cfg.samples_per_latent
  wave = jnp.asarray(np.random.default_rng(0).uniform(-0.5, 0.5, (_BATCH.value, 2, samples)), jnp.float32)
  encode = jax.jit(lambda p, w: codec_lib.encode_binaural(cfg, p, w, dtype))
  decode = jax.jit(lambda p, z: codec_lib.decode_binaural(cfg, p, z, dtype))
  start = time.perf_counter()
  encode_c = encode.lower(params, wave).compile()
  latents = encode_c(params, wave).mean
  decode_c = decode.lower(params, latents).compile()
  compile_s = time.perf_counter() - start
  encode_s = median_seconds(encode_c, params, wave, repeats=_REPEATS.value)
  decode_s = median_seconds(decode_c, params, latents, repeats=_REPEATS.value)
  audio_s = _BATCH.value * samples / cfg.sample_rate  # stereo clip-seconds per call
  return {
      'preset': name, 'dtype': _DTYPE.value, 'batch': _BATCH.value, 'clip_s': samples / cfg.sample_rate,
      'latent_shape': list(latents.shape),
      'vae_params_M': sum(np.size(x) for x in jax.tree.leaves(params['vae'])) / 1e6,
      'vocoder_params_M': sum(np.size(x) for x in jax.tree.leaves(params['vocoder'])) / 1e6,
      'encode_s': encode_s, 'decode_vocode_s': decode_s,
      'encode_x_realtime': audio_s / encode_s, 'decode_x_realtime': audio_s / decode_s,
      'compile_s': compile_s,
      'decode_gflop': (decode_c.cost_analysis() or {}).get('flops', float('nan')) / 1e9,
  }


def main(argv):
  del argv
  device = jax.devices()[0]
  out = pathlib.Path(_OUT.value or f'bench/results/audio_{device.platform}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  cols = ['preset', 'dtype', 'batch', 'clip_s', 'encode_s', 'decode_vocode_s', 'encode_x_realtime',
          'decode_x_realtime', 'decode_gflop', 'compile_s']
  print(f'device: {device.device_kind} ({device.platform}), jax {jax.__version__}')
  print(' | '.join(f'{c:>17}' for c in cols), flush=True)
  rows = []
  for preset in _PRESETS.value:  # each row is printed and saved as soon as it is measured
    rows.append(measure(preset))
    print(' | '.join(f'{v:>17.3f}' if isinstance(v, float) else f'{v!s:>17}' for v in map(rows[-1].get, cols)),
          flush=True)
    out.write_text(json.dumps({'device': device.device_kind, 'platform': device.platform,
                               'jax': jax.__version__, 'rows': rows}, indent=2))
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
