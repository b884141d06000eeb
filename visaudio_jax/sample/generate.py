"""Features of many clips -> binaural waveforms, in fixed-shape batches: the jitted flow-matching
sampler and the codec's decoder, compiled once per batch shape."""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax import components
from visaudio_jax.audio import codec as codec_lib
from visaudio_jax.audio.wav import write_wav
from visaudio_jax.model import flow_matching as fm
from visaudio_jax.model.network import FlowNetwork

FEATURES = ('clip_f', 'sync_f', 'text_f', 'pe_f')


def balanced_batch(count: int, max_batch: int = 16) -> int:
  """The batch size that splits `count` clips into the fewest batches of at most `max_batch`, all of
  one size (the last padded): one compiled shape, and little padding (18 clips -> 2 x 9, not 16 + 2)."""
  return -(-count // -(-count // max_batch))


class WaveSampler:
  """The network's sampler and the codec's decoder, jitted once; call it with params and clips."""

  def __init__(self, model: FlowNetwork, flow: fm.FlowMatchingConfig, codec_cfg: codec_lib.CodecConfig,
               codec_params: dict | None):
    self.flow = flow
    self.codec_cfg, self.codec_params = codec_cfg, codec_params
    self._sample = fm.make_sampler(model, flow)
    self._decode = jax.jit(functools.partial(codec_lib.decode_binaural, codec_cfg))

  @classmethod
  def from_config(cls, model: FlowNetwork, config: Any) -> 'WaveSampler':
    """The experiment config's flow matching and codec (`config.flow`, `config.codec`)."""
    return cls(model, fm.flow_config(config.flow), *components.load_codec(config.codec))

  @property
  def makes_sound(self) -> bool:
    """False for a VAE codec without weights: it cannot turn latents into sound."""
    return self.codec_params is not None

  def __call__(self, params: Any, clips: Mapping[str, np.ndarray], seed: int, batch: int | None = None
               ) -> np.ndarray:
    """(K, E, L) waveforms for the clips' features ('clip_f', ..., 'latent_mean' for the latent shape,
    'audio' for the length to crop to). Batches of `batch` clips (default `balanced_batch`), the last
    padded with repeats of the final clip; each batch draws its noise from fold_in(key(seed), its first
    index), so a clip listed twice gets two draws."""
    if not self.makes_sound:
      raise ValueError('the codec has no weights (codec.vae_ckpt, codec.vocoder_ckpt): no waveforms')
    params = jax.device_get(params)  # sampling runs replicated on the default device
    count = len(clips['id'])
    batch = batch or balanced_batch(count)
    waves = []
    for start in range(0, count, batch):
      rows = np.minimum(np.arange(start, start + batch), count - 1)
      feats = {k: jnp.asarray(clips[k][rows]) for k in FEATURES if k in clips}
      x0 = fm.initial_noise(jax.random.fold_in(jax.random.key(seed), start),
                            (batch,) + clips['latent_mean'].shape[1:], self.flow.ear_noise_correlation)
      latents = self._sample({'params': params}, feats, x0)
      waves.append(np.asarray(self._decode(self.codec_params, latents))[:count - start])
    return np.concatenate(waves)[..., :clips['audio'].shape[-1]]


def write_waves(directory: str | os.PathLike, ids, waves: np.ndarray, sample_rate: int) -> None:
  """One stereo WAV per clip, `<directory>/<id>.wav`."""
  os.makedirs(directory, exist_ok=True)
  for clip_id, wave in zip(ids, waves):
    write_wav(os.path.join(directory, f'{clip_id}.wav'), wave, sample_rate)
