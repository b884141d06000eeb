"""MMAudio checkpoints <-> our params: import, mono -> binaural, and MMAudio's `forward` for parity.

A torch Linear weight (out, in) becomes a kernel (in, out); a Conv1d weight (out, in, k) becomes
(k, in, out); the fused qkv Linear, whose 3D outputs MMAudio interleaves as (head, dim, q/k/v), is
de-interleaved into a (D, 3, H, Dh) kernel. Per-ear modules get a leading ear axis (1 for mono).
The stale non-persistent buffers some old checkpoints carry (`latent_rot`, `clip_rot`,
`t_embed.freqs`) are dropped: we rebuild them for the lengths in use.

Stable API (outside checks call these): `load_mmaudio`, `to_binaural`, `forward`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, NamedTuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax.convert.torch_io import CheckpointError, read_state_dict
from visaudio_jax.model.config import NetworkConfig, network_config
from visaudio_jax.model.network import FlowNetwork, init_variables
from visaudio_jax.model.presets import ARCHITECTURES, MMAUDIO_SIZES, model_config
from visaudio_jax.model.tables import Tables
from visaudio_jax.model import layout

STALE_BUFFERS = ('latent_rot', 'clip_rot', 't_embed.freqs')
Params = dict


class KeyMap(NamedTuple):
  torch_key: str
  path: tuple[str, ...]  # path in our (unrolled) params['params']
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]
  ear: bool  # a per-ear branch param (leading ear axis in our layout)


def _linear():
  return (lambda w: w.T), (lambda k: k.T)


def _conv():
  return (lambda w: w.transpose(2, 1, 0)), (lambda k: k.transpose(2, 1, 0))


def _ident():
  return (lambda w: w), (lambda w: w)


def _reshape(flax_shape, torch_shape):
  return (lambda w: w.reshape(flax_shape)), (lambda w: w.reshape(torch_shape))


def _qkv_weight(h, dh):
  # torch row (h*Dh + d)*3 + j  ->  kernel[:, j, h, d]
  return (lambda w: w.reshape(h, dh, 3, -1).transpose(3, 2, 0, 1),
          lambda k: k.transpose(2, 3, 1, 0).reshape(3 * h * dh, -1))


def _qkv_bias(h, dh):
  return (lambda b: b.reshape(h, dh, 3).transpose(2, 0, 1),
          lambda b: b.transpose(1, 2, 0).reshape(-1))


def _ear(fns):
  """Per-ear param: a leading ear axis of 1 in our layout."""
  to_flax, to_torch = fns
  return (lambda w: to_flax(w)[None]), (lambda k: to_torch(k[0]))


def mmaudio_key_map(cfg: NetworkConfig) -> list[KeyMap]:
  """Every MMAudio state-dict key with its place and transform in our unrolled mono params."""
  h, dh = cfg.num_heads, cfg.head_dim
  entries: list[KeyMap] = []

  def add(key, path, fns, ear=False):
    entries.append(KeyMap(key, tuple(path.split('/')), *(_ear(fns) if ear else fns), ear))

  def linear(tkey, path, ear=False, bias=True):
    add(f'{tkey}.weight', f'{path}/kernel', _linear(), ear)
    if bias:
      add(f'{tkey}.bias', f'{path}/bias', _ident(), ear)

  def conv(tkey, path, ear=False, bias=True):
    add(f'{tkey}.weight', f'{path}/kernel', _conv(), ear)
    if bias:
      add(f'{tkey}.bias', f'{path}/bias', _ident(), ear)

  def swiglu(tkey, path, kernel_size, ear=False):
    for w in ('w1', 'w2', 'w3'):
      (conv if kernel_size > 1 else linear)(f'{tkey}.{w}', f'{path}/{w}', ear=ear, bias=False)

  def single_block(tkey, path, kernel_size, pre_only, ear):
    add(f'{tkey}.attn.qkv.weight', f'{path}/qkv/kernel', _qkv_weight(h, dh), ear)
    add(f'{tkey}.attn.qkv.bias', f'{path}/qkv/bias', _qkv_bias(h, dh), ear)
    add(f'{tkey}.attn.q_norm.weight', f'{path}/q_norm/scale', _ident(), ear)
    add(f'{tkey}.attn.k_norm.weight', f'{path}/k_norm/scale', _ident(), ear)
    if not pre_only:
      (conv if kernel_size > 1 else linear)(f'{tkey}.linear1', f'{path}/linear1', ear=ear)
      swiglu(f'{tkey}.ffn', f'{path}/ffn', kernel_size, ear=ear)
    linear(f'{tkey}.adaLN_modulation.1', f'{path}/ada_ln', ear=ear)

  add('sync_pos_emb', 'sync_pos_emb', _reshape((8, cfg.sync_dim), (1, 1, 8, cfg.sync_dim)))
  add('latent_mean', 'latent_mean', _reshape((cfg.latent_dim,), (1, 1, cfg.latent_dim)))
  add('latent_std', 'latent_std', _reshape((cfg.latent_dim,), (1, 1, cfg.latent_dim)))
  add('empty_string_feat', 'empty_string_feat', _ident())
  add('empty_clip_feat', 'empty_clip_feat', _reshape((cfg.clip_dim,), (1, cfg.clip_dim)))
  add('empty_sync_feat', 'empty_sync_feat', _reshape((cfg.sync_dim,), (1, cfg.sync_dim)))
  mlp_index = 2 if cfg.v2 else 1
  conv('audio_input_proj.0', 'audio_input_proj_conv', ear=True)
  swiglu('audio_input_proj.2', 'audio_input_proj_mlp', 7, ear=True)
  linear('clip_input_proj.0', 'clip_input_proj_linear')
  swiglu(f'clip_input_proj.{mlp_index}', 'clip_input_proj_mlp', 3)
  conv('sync_input_proj.0', 'sync_input_proj_conv')
  swiglu('sync_input_proj.2', 'sync_input_proj_mlp', 3)
  linear('text_input_proj.0', 'text_input_proj_linear')
  swiglu(f'text_input_proj.{mlp_index}', 'text_input_proj_mlp', 1)
  linear('clip_cond_proj', 'clip_cond_proj')
  linear('text_cond_proj', 'text_cond_proj')
  swiglu('global_cond_mlp', 'global_cond_mlp', 1)
  linear('final_layer.adaLN_modulation.1', 'final_layer/ada_ln', ear=True)
  conv('final_layer.conv', 'final_layer/conv', ear=True)
  linear('t_embed.mlp.0', 't_embed_1')
  linear('t_embed.mlp.2', 't_embed_2')
  n1 = cfg.num_joint_blocks
  for i in range(n1):
    pre_only = i == n1 - 1
    path = 'last_joint_block' if pre_only else f'joint_blocks_{i}'
    single_block(f'joint_blocks.{i}.latent_block', f'{path}/latent_block', 3, False, ear=True)
    single_block(f'joint_blocks.{i}.clip_block', f'{path}/clip_block', 3, pre_only, ear=False)
    single_block(f'joint_blocks.{i}.text_block', f'{path}/text_block', 1, pre_only, ear=False)
  for i in range(cfg.fused_depth):
    single_block(f'fused_blocks.{i}', f'fused_blocks_{i}/block', 3, False, ear=True)
  return entries


# ---- variants ------------------------------------------------------------------------------------

def mono_config(model, **overrides) -> NetworkConfig:
  """MMAudio itself: one ear, no spacetime module, our layout unrolled."""
  cfg = model if isinstance(model, NetworkConfig) else network_config(model)
  return dataclasses.replace(cfg, channels=1, branch_weights='separate', joint_mode='concat',
                             spacetime=dataclasses.replace(cfg.spacetime, enabled=False), **overrides)


def infer_config(state: dict[str, np.ndarray]) -> NetworkConfig:
  """The MMAudio preset whose shapes match a state dict (sequence lengths from the preset)."""
  v2 = 'clip_input_proj.2.w1.weight' in state
  depth_joint = len({k.split('.')[1] for k in state if k.startswith('joint_blocks.')})
  depth_fused = len({k.split('.')[1] for k in state if k.startswith('fused_blocks.')})
  try:
    found = dict(latent_dim=state['latent_mean'].shape[-1], hidden_dim=state['clip_cond_proj.weight'].shape[0],
                 depth=depth_joint + depth_fused, fused_depth=depth_fused, v2=v2)
  except KeyError as err:
    raise CheckpointError(f'not an MMAudio state dict: key {err} is missing') from None
  for name in MMAUDIO_SIZES:
    if all(ARCHITECTURES[name].get(k, False) == v for k, v in found.items()):
      return mono_config(model_config(name, mono=True))
  raise CheckpointError(f'state dict with {found} matches no MMAudio preset '
                        f'({sorted(MMAUDIO_SIZES)}); pass variant= a NetworkConfig')


def abstract_params(cfg: NetworkConfig) -> Params:
  """Param shapes/dtypes via `jax.eval_shape` (nothing allocated), boxes removed."""
  return nn.meta.unbox(jax.eval_shape(lambda: init_variables(cfg)))


def state_dict_to_params(state: dict[str, np.ndarray], cfg: NetworkConfig, source: str = 'state dict'
                         ) -> Params:
  """Strict conversion: every key used, every param filled, every shape right; else one clear error."""
  state = {k: v for k, v in state.items() if k not in STALE_BUFFERS}
  unrolled = dataclasses.replace(cfg, scan_layers=False)
  abstract = traverse_util.flatten_dict(abstract_params(unrolled)['params'])
  key_map = mmaudio_key_map(unrolled)
  missing = [m.torch_key for m in key_map if m.torch_key not in state]
  unexpected = sorted(set(state) - {m.torch_key for m in key_map})
  misshaped, params = [], {}
  for m in key_map:
    if m.torch_key not in state:
      continue
    want = abstract[m.path].shape
    value = np.asarray(m.to_flax(np.asarray(state[m.torch_key])))
    if value.shape != want:
      misshaped.append(f'{m.torch_key}: {tuple(state[m.torch_key].shape)} gives {value.shape}, need {want}')
      continue
    params[m.path] = value.astype(np.float32)
  if missing or unexpected or misshaped:
    parts = [f'{len(missing)} missing: {missing[:20]}' if missing else '',
             f'{len(unexpected)} unexpected: {unexpected[:20]}' if unexpected else '',
             f'{len(misshaped)} mis-shaped: {misshaped[:20]}' if misshaped else '']
    raise CheckpointError(f'{source} does not fit MMAudio config (hidden_dim={cfg.hidden_dim}, '
                          f'depth={cfg.depth}, fused_depth={cfg.fused_depth}, latent_dim={cfg.latent_dim}, '
                          f'v2={cfg.v2}): ' + '; '.join(p for p in parts if p))
  if set(abstract) != set(params):  # a mapping bug, not a user error
    raise AssertionError(f'key map out of sync with the network: {sorted(set(abstract) ^ set(params))[:10]}')
  params = {'params': traverse_util.unflatten_dict(params)}
  return layout.stack_layers(params, cfg) if cfg.scan_layers else params


def params_to_state_dict(params: Params, cfg: NetworkConfig) -> dict[str, np.ndarray]:
  """Inverse of `state_dict_to_params` for a mono model (MMAudio's key names and layouts)."""
  if cfg.channels != 1 or cfg.spacetime.enabled:
    raise ValueError('params_to_state_dict takes a mono model; take one ear of a binaural model '
                     'with visaudio_jax.convert.mmaudio.ear_params first')
  if cfg.scan_layers:
    params = layout.unstack_layers(params, cfg)
  flat = traverse_util.flatten_dict(params['params'])
  return {m.torch_key: np.asarray(m.to_torch(np.asarray(flat[m.path]))) for m in
          mmaudio_key_map(dataclasses.replace(cfg, scan_layers=False))}


def ear_params(cfg: NetworkConfig, params: Params, ear: int) -> tuple[NetworkConfig, Params]:
  """One ear of a binaural model as a mono MMAudio model (for MMAudio's own format). Lossy by design:
  the spacetime module, cross-ear attention bias and ear embedding have no place in MMAudio."""
  if not 0 <= ear < cfg.channels:
    raise ValueError(f'ear must be in [0, {cfg.channels}), got {ear}')
  if cfg.scan_layers:
    params = layout.unstack_layers(params, cfg)
  mono_cfg = mono_config(cfg, scan_layers=False)
  separate = cfg.branch_weights == 'separate'
  flat, out = traverse_util.flatten_dict(params['params']), {}
  for m in mmaudio_key_map(mono_cfg):
    value = np.asarray(flat[m.path])
    if m.ear:
      value = value[ear:ear + 1] if separate else value[None]
    out[m.path] = value
  return mono_cfg, {'params': traverse_util.unflatten_dict(out)}


def load_mmaudio(path: str | os.PathLike, variant: str | NetworkConfig | None = None
                 ) -> tuple[NetworkConfig, Params]:
  """Read an MMAudio checkpoint (.pth without running pickled code, or .safetensors).

  variant: a preset name ('small_16k', ..., 'large_44k_v2'), a NetworkConfig, or None to infer the
  preset from the tensor shapes. Returns the mono config and float32 NumPy params.
  """
  state = read_state_dict(path)
  if variant is None:
    cfg = infer_config(state)
  elif isinstance(variant, str):
    cfg = mono_config(model_config(variant, mono=True))
  else:
    cfg = variant
  if cfg.channels != 1 or cfg.spacetime.enabled:
    raise ValueError(f'load_mmaudio: variant must be a mono config (channels=1, no spacetime), '
                     f'got channels={cfg.channels}, spacetime={cfg.spacetime.enabled}')
  return cfg, state_dict_to_params(state, cfg, source=str(path))


def to_binaural(cfg: NetworkConfig, params: Params, channels: int = 2, spacetime=None,
                seed: int = 0, **overrides) -> tuple[NetworkConfig, Params]:
  """Initialise the dual-branch model from mono weights: each ear a copy of the MMAudio branch;
  new ViSAudio params (spacetime module, empty PE token, ear embedding) take their fresh init, with
  the spacetime output projection at zero, so each ear initially outputs MMAudio's flow (exactly, for
  equal ears, in the default concat mode). `overrides` set other fields of the new config
  (branch_weights, joint_mode, dtype...)."""
  if cfg.channels != 1:
    raise ValueError(f'to_binaural: expected a mono config, got channels={cfg.channels}')
  mono = layout.unstack_layers(params, cfg) if cfg.scan_layers else params
  spacetime = spacetime or dataclasses.replace(cfg.spacetime, enabled=True)
  new_cfg = dataclasses.replace(cfg, channels=channels, spacetime=spacetime, **overrides)
  unrolled = dataclasses.replace(new_cfg, scan_layers=False)
  fresh = jax.tree.map(np.asarray, nn.meta.unbox(init_params(unrolled, seed)))

  def merge(fresh_tree, mono_tree):
    out = {}
    for k, v in fresh_tree.items():
      if k not in mono_tree:
        out[k] = v
      elif isinstance(v, dict):
        out[k] = merge(v, mono_tree[k])
      else:
        m = np.asarray(mono_tree[k])
        if m.shape == v.shape:
          out[k] = m
        elif m.shape[0] == 1 and m.shape[1:] == v.shape[1:]:
          out[k] = np.repeat(m, v.shape[0], axis=0)  # separate branches: one copy per ear
        elif m.shape[0] == 1 and m.shape[1:] == v.shape:
          out[k] = m[0]  # shared branch weights
        else:
          raise ValueError(f'to_binaural: cannot map mono param {k} {m.shape} to {v.shape}')
    return out

  out = {'params': merge(fresh['params'], mono['params'])}
  return new_cfg, (layout.stack_layers(out, new_cfg) if new_cfg.scan_layers else out)


def init_params(cfg: NetworkConfig, seed: int = 0) -> Params:
  """Fresh params with MMAudio's initialisation (boxed with logical axis names)."""
  return jax.jit(lambda: init_variables(cfg, seed))()


def forward(cfg: NetworkConfig, params: Params, latent, clip_f, sync_f, text_f, t,
            tables: Tables | None = None):
  """MMAudio's `MMAudio.forward(latent, clip_f, sync_f, text_f, t)` for a mono model: latent
  (B, N, C) -> flow (B, N, C), conditions preprocessed inside. Computes in the inputs' dtype
  (float64 when x64 is enabled); `tables` overrides the rebuilt RoPE/time/index tables."""
  dtype = jnp.asarray(latent).dtype
  run_cfg = dataclasses.replace(cfg, dtype=dtype.name, param_dtype=dtype.name)
  cast = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  out = FlowNetwork(run_cfg).apply(cast, jnp.asarray(latent)[:, None], jnp.asarray(t, dtype),
                                   jnp.asarray(clip_f, dtype), jnp.asarray(sync_f, dtype),
                                   jnp.asarray(text_f, dtype), tables=tables)
  return out[:, 0]
