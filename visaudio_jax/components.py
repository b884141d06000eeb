"""Config block -> loaded component: the one place where a config file's `codec`, `encoders` and
network weights become arrays, from official checkpoints (through `convert`) or seeded.

It sits above `convert` and below `data`, so feature extraction, sampling and training load
components the same way, and the lower layers (audio, encoders, model) never import an importer.
A training run's Orbax checkpoints are a weight source too (`run_config`, `restore_run_params`):
`train.init_from`, `sample.py --checkpoint=RUN_DIR` and the post-hoc EMA tool read them here.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

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


# ---- a training run's checkpoints ---------------------------------------------------------------

CHECKPOINT_ITEMS = ('state', 'data', 'config')  # what train.py saves in each <workdir>/checkpoints/<step>/


def run_checkpoint(path: str | os.PathLike) -> tuple[pathlib.Path, int]:
  """A run directory, its `checkpoints/` directory or one `checkpoints/<step>/` -> (checkpoints
  directory, step): the latest step unless the path names one."""
  path = pathlib.Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f'{path}: no such directory (expected a train.py workdir or <workdir>/checkpoints/<step>)')
  if (path / 'checkpoints').is_dir():
    path = path / 'checkpoints'
  if path.name.isdigit() and (path / 'state').is_dir():
    return path.parent, int(path.name)
  steps = [int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / 'state').is_dir()]
  if not steps:
    raise FileNotFoundError(f'{path}: no finished checkpoint (expected <step>/state/ from train.py)')
  return path, max(steps)


def _read_only_manager(directory: pathlib.Path, handlers: dict) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, item_names=CHECKPOINT_ITEMS, item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(read_only=True))


def run_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config a run's checkpoint was saved with (its 'config' item)."""
  directory, step = run_checkpoint(path)
  with _read_only_manager(directory, {'config': ocp.JsonCheckpointHandler()}) as manager:
    try:
      stored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    except (FileNotFoundError, KeyError, ValueError) as e:
      raise FileNotFoundError(f'{directory / str(step)}: holds no config item ({e})') from e
  return ml_collections.ConfigDict(stored)


def restore_run_params(path: str | os.PathLike, abstract_params: Any, ema: str = '') -> Any:
  """One params tree of a run's checkpoint (the raw params, or the EMA called `ema`), without the
  optimiser state, placed as `abstract_params` (ShapeDtypeStructs, optionally with shardings) says.
  Raises with what the checkpoint holds when the EMA is absent or the shapes do not fit."""
  directory, step = run_checkpoint(path)
  where = f'{directory / str(step)}'
  # A partial restore (one subtree, no optimiser state) goes through the PyTree handler.
  with _read_only_manager(directory, {'state': ocp.PyTreeCheckpointHandler()}) as manager:
    stored = manager.item_metadata(step).state.tree
    if ema:
      emas = sorted(stored.get('ema') or {})
      if ema not in emas:
        raise ValueError(f'{where}: has no EMA {ema!r}; its EMAs are {emas or "none"} (or use the raw params)')
      target = {'ema': {ema: abstract_params}}
    else:
      if 'params' not in stored:
        raise ValueError(f'{where}: its state holds no params ({sorted(stored)})')
      target = {'params': abstract_params}
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    except (ValueError, KeyError) as e:
      raise ValueError(f'{where}: its params do not fit this network config (a run of another config?): {e}') from e
  params = restored.state['ema'][ema] if ema else restored.state['params']
  wrong = [f'{jax.tree_util.keystr(path)} {tuple(x.shape)} (wanted {tuple(want.shape)})' for path, x, want in
           zip(*zip(*jax.tree_util.tree_flatten_with_path(params)[0]), jax.tree.leaves(abstract_params))
           if tuple(x.shape) != tuple(want.shape)]
  if wrong:
    raise ValueError(f'{where}: its params do not fit this network config (a run of another config?): '
                     + ', '.join(wrong[:5]) + (f' and {len(wrong) - 5} more' if len(wrong) > 5 else ''))
  return params
