"""Batch sampling: params (fresh seeded, or imported MMAudio weights made binaural) + features ->
binaural latents, with a jitted Euler/Heun CFG loop -> stereo WAV files through the audio codec.

Features come from videos and captions through the conditioning encoders (the config's
`encoders` block: the tiny config's seeded encoders, or the official checkpoints), or, with no
video, are seeded random stand-ins of the right shapes. The codec is the config's `codec` block:
the tiny config's mel codec needs no weights; MMAudio's VAE + vocoder need their checkpoints
(`codec.vae_ckpt`, `codec.vocoder_ckpt`), without which only latents are written.
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import ml_collections
import numpy as np

from visaudio_jax import components, encoders
from visaudio_jax.audio import codec as codec_lib
from visaudio_jax.audio.wav import write_wav
from visaudio_jax.convert.torch_io import write_safetensors
from visaudio_jax.files import write_json
from visaudio_jax.model import flow_matching as fm
from visaudio_jax.model.config import NetworkConfig
from visaudio_jax.model.network import FlowNetwork, check_shape, feature_shapes


def random_features(cfg: NetworkConfig, batch: int, seed: int) -> tuple[dict, jax.Array]:
  """Seeded stand-in features and the initial noise x0 (B, E, N, C)."""
  rng = np.random.default_rng(seed)
  arrays = {k: rng.standard_normal((batch,) + s).astype(np.float32) for k, s in feature_shapes(cfg).items()}
  x0 = arrays.pop('latent')
  return arrays, x0


def video_features(config: ml_collections.ConfigDict, net: NetworkConfig, videos: list[str],
                   captions: list[str]) -> dict:
  """Decode `videos` and run the conditioning encoders: the network's feature dict (B, ...)."""
  enc_cfg, enc_params = components.encoders_from_config(config.encoders, config.seed)
  feats = encoders.extract(videos, captions, enc_cfg, enc_params, duration_s=net.duration_s, pad=True)
  if not net.spacetime.enabled:
    feats.pop('pe_f', None)
  for name, shape in feature_shapes(net).items():
    if name != 'latent':
      check_shape(f'{name} from encoders preset {config.encoders.preset!r}', feats.get(name), shape, len(videos))
  return feats


def run(config: ml_collections.ConfigDict, output_dir: str, mmaudio_ckpt: str | None = None,
        videos: list[str] | None = None, captions: list[str] | None = None) -> dict:
  net, params = components.network_params(config, mmaudio_ckpt)
  codec_cfg, codec_params = (None, None)
  if config.codec.preset:
    codec_cfg, codec_params = components.load_codec(config.codec)
    codec_lib.check_matches_network(codec_cfg, net)
  flow = fm.flow_config(config.flow)
  feats, x0 = random_features(net, len(videos) if videos else config.sample.batch_size, config.seed)
  x0 = fm.correlate_ears(x0, flow.ear_noise_correlation)
  if videos:
    captions = captions or [''] * len(videos)
    if len(captions) != len(videos):
      raise ValueError(f'{len(videos)} videos but {len(captions)} captions')
    feats = video_features(config, net, videos, captions)
  sampler = fm.make_sampler(FlowNetwork(net), flow)
  start = time.perf_counter()
  compiled = sampler.lower(params, feats, x0).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  latents = np.asarray(jax.block_until_ready(compiled(params, feats, x0)))
  run_s = time.perf_counter() - start
  if not np.isfinite(latents).all():
    raise FloatingPointError('sampling produced non-finite latents')
  nfe = flow.num_steps * (2 if flow.method == 'heun' else 1) * (2 if flow.cfg_strength >= 1 else 1)
  summary = {
      'preset': config.preset, 'params': int(sum(np.size(x) for x in jax.tree.leaves(params))),
      'weights': mmaudio_ckpt or f'fresh init, seed {config.seed} (untrained)',
      'features': (f'encoders {config.encoders.preset} on {videos}' if videos else
                   f'seeded random stand-ins, seed {config.seed}'),
      'batch': int(x0.shape[0]), 'latent_shape': list(latents.shape),
      'steps': flow.num_steps, 'method': flow.method, 'cfg_strength': flow.cfg_strength,
      'network_evals_per_sample_batch': nfe, 'compile_s': round(compile_s, 3), 'sample_s': round(run_s, 3),
      'latent_rms': float(np.sqrt(np.mean(latents ** 2))),
      'left_right_rms_diff': float(np.sqrt(np.mean((latents[:, 0] - latents[:, -1]) ** 2))),
      'device': jax.devices()[0].device_kind,
  }
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  if codec_params is not None:
    start = time.perf_counter()
    waves = np.asarray(jax.jit(lambda p, z: codec_lib.decode_binaural(codec_cfg, p, z))(codec_params, latents))
    summary['decode_s'] = round(time.perf_counter() - start, 3)
    summary['wav_files'] = []
    for i, wave in enumerate(waves):  # (E, L) each
      write_wav(out / f'sample_{i}.wav', wave, codec_cfg.sample_rate)
      summary['wav_files'].append(f'sample_{i}.wav')
    summary['wave_rms_left_right'] = [float(np.sqrt(np.mean(waves[:, e] ** 2))) for e in (0, -1)]
  elif config.codec.preset:
    summary['wav_files'] = f'none: codec {config.codec.preset} needs codec.vae_ckpt and codec.vocoder_ckpt'
  write_safetensors({'latents': latents}, out / 'latents.safetensors',
                    metadata={'config': config.to_json(), 'summary': json.dumps(summary)})
  write_json(out / 'summary.json', summary, indent=2)
  return summary
