"""Config block -> loaded component: the one place where a config file's `codec`, `encoders` and
network weights become arrays, from official checkpoints (through `convert`) or seeded.

It sits above `convert` and below `data`, so feature extraction, sampling and training load
components the same way, and the lower layers (audio, encoders, model) never import an importer.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from visaudio_jax.audio.codec import CodecConfig, codec_config
from visaudio_jax.convert import audio as convert_audio
from visaudio_jax.convert import encoders as convert_encoders
from visaudio_jax.convert import mmaudio
from visaudio_jax.encoders.features import EncodersConfig, encoders_config, init_encoders
from visaudio_jax.model.config import NetworkConfig, network_config


def load_codec(block: Any) -> tuple[CodecConfig, dict | None]:
  """A config file's `codec` block (preset, vae_ckpt, vocoder_ckpt) -> (config, params); params None
  when a 'vae' codec has no checkpoints (it cannot make sound from random weights)."""
  cfg = codec_config(block.preset)
  if cfg.kind == 'mel':
    return cfg, {}
  if not (block.vae_ckpt and block.vocoder_ckpt):
    return cfg, None
  vae_cfg, vae = convert_audio.load_vae(block.vae_ckpt, cfg.vae)
  vocoder_cfg, vocoder = convert_audio.load_vocoder(block.vocoder_ckpt, cfg.vocoder)
  return dataclasses.replace(cfg, vae=vae_cfg, vocoder=vocoder_cfg), {'vae': vae, 'vocoder': vocoder}


def load_encoders(cfg: EncodersConfig, clip_ckpt: str | None, sync_ckpt: str | None,
                  pe_ckpt: str | None = None) -> tuple[EncodersConfig, dict]:
  """Official checkpoints (open_clip DFN5B, Synchformer, PE-Spatial) -> (config, params)."""
  missing = [n for n, p in (('clip', clip_ckpt), ('sync', sync_ckpt), ('pe', pe_ckpt))
             if not p and (n != 'pe' or cfg.pe is not None)]
  if missing:
    raise ValueError(f'load_encoders: no checkpoint given for {missing}')
  clip_cfg, clip_params = convert_encoders.load_clip(clip_ckpt, cfg.clip)
  sync_cfg, sync_params = convert_encoders.load_synchformer(sync_ckpt, cfg.sync)
  params = {'clip': clip_params, 'sync': sync_params}
  pe_cfg = None
  if cfg.pe is not None:
    pe_cfg, params['pe'] = convert_encoders.load_perception(pe_ckpt, cfg.pe)
  return dataclasses.replace(cfg, clip=clip_cfg, sync=sync_cfg, pe=pe_cfg), params


def encoders_from_config(block: Any, seed: int = 0) -> tuple[EncodersConfig, dict]:
  """A config file's `encoders` block (preset, clip_ckpt, sync_ckpt, pe_ckpt, seeded) -> (config,
  params): the official checkpoints when given, else seeded random weights where the block allows
  them (`seeded`: the CPU demo's stand-in encoders)."""
  cfg = encoders_config(block.preset)
  if block.clip_ckpt or block.sync_ckpt or block.pe_ckpt:
    return load_encoders(cfg, block.clip_ckpt, block.sync_ckpt, block.pe_ckpt or None)
  if block.get('seeded', False):
    return cfg, init_encoders(cfg, seed)
  raise ValueError(f'encoders preset {block.preset!r} needs encoders.clip_ckpt, sync_ckpt and pe_ckpt '
                   '(or encoders.seeded=True for seeded random weights)')


def network_params(config: ml_collections.ConfigDict, mmaudio_ckpt: str | None) -> tuple[NetworkConfig, dict]:
  """The config's network with fresh seeded params, or with an MMAudio checkpoint's (made binaural,
  spacetime module at zero, when the config is binaural). Returns (network config, {'params': ...})."""
  net = network_config(config.model)
  if not mmaudio_ckpt:
    return net, jax.tree.map(np.asarray, nn.meta.unbox(mmaudio.init_params(net, config.seed)))
  mono_net, params = mmaudio.load_mmaudio(mmaudio_ckpt, mmaudio.mono_config(net))
  if net.channels == 1 and not net.spacetime.enabled:
    return net, params
  binaural_net, params = mmaudio.to_binaural(mono_net, params, net.channels, net.spacetime, config.seed,
                                            branch_weights=net.branch_weights, joint_mode=net.joint_mode)
  if binaural_net != net:
    raise ValueError(f'{mmaudio_ckpt}: made binaural it gives network {binaural_net}, the config asks for {net}')
  return net, params
