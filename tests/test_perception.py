"""Perception Encoder (PE-Spatial) vision tower and checkpoint import against the golden fixtures.

Golden data: tests/fixtures/visual/pe (copied from shared/fixtures/visual/pe; its README §3
describes every tensor), written by the official `core/vision_encoder/pe.py` in float64:
`pe_spatial_reduced_{cls,ls}_config.json`, `pe_spatial_reduced_{cls,ls}_state_dict.safetensors`,
`pe_spatial_reduced_ls_state_dict.pth`, `pe_spatial_reduced_{cls,ls}_io.safetensors` (cases
`native` and `other_res`), and the full-size key/shape manifests `manifests/PE-Spatial-*.json`.
Fixture images are (B, 3, H, W); ours are channels-last, hence the transposes.

Tolerances (max abs error / max abs reference): float64 runs < 1e-9 with the fixture's float32
RoPE tables injected or with all-float64 RoPE (measured ~1e-15); float64 with our own float32
tables < 1e-6 (torch's float32 cos / sin differ by 1 ulp at a few angles: ~3e-8); float32 < 1e-5.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from conftest import fixture_path
from visaudio_jax.convert import perception as convert
from visaudio_jax.convert.state_dict import torch_shapes
from visaudio_jax.convert.torch_io import CheckpointError, write_safetensors
from visaudio_jax.encoders import perception as pe
from visaudio_jax.model.layers import apply_rope

VARIANTS = ('cls', 'ls')
CASES = ('native', 'other_res')
SPATIAL = ('PE-Spatial-G14-448', 'PE-Spatial-L14-448', 'PE-Spatial-B16-512', 'PE-Spatial-S16-512',
           'PE-Spatial-T16-512')
PARAM_COUNTS = {  # README §3 table
    'PE-Spatial-G14-448': 1_851_887_104, 'PE-Spatial-L14-448': 303_964_160, 'PE-Spatial-B16-512': 86_433_792,
    'PE-Spatial-S16-512': 21_983_232, 'PE-Spatial-T16-512': 5_683_200}


def path(*parts: str):
  return fixture_path('visual', 'pe', *parts)


@functools.cache
def config(variant: str) -> pe.PEConfig:
  raw = json.loads(path(f'pe_spatial_reduced_{variant}_config.json').read_text())
  return pe.PEConfig(image_size=raw['image_size'], patch_size=raw['patch_size'], width=raw['width'],
                     layers=raw['layers'], heads=raw['heads'], mlp_width=raw['mlp_width'],
                     use_cls_token=raw['use_cls_token'], layer_scale=raw['ls_init_value'] is not None,
                     use_abs_posemb=raw['use_abs_posemb'], use_rope2d=raw['use_rope2d'], use_ln_pre=raw['use_ln_pre'])


@functools.cache
def io(variant: str) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(path(f'pe_spatial_reduced_{variant}_io.safetensors')))


@functools.cache
def state(variant: str) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(path(f'pe_spatial_reduced_{variant}_state_dict.safetensors')))


@functools.cache
def manifest(name: str) -> dict:
  return json.loads(path('manifests', f'{name}.json').read_text())


def images(variant: str, case: str) -> np.ndarray:
  return io(variant)[f'{case}.images'].transpose(0, 2, 3, 1)


def max_rel(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  return float(np.abs(got - ref).max() / np.abs(ref).max())


@functools.partial(jax.jit, static_argnums=0)
def run(cfg, params, x, rot):
  """All tokens, ln_pre output and block outputs, RoPE rotations given."""
  tokens, state = pe.PerceptionEncoder(cfg).apply({'params': params}, x, rot, capture_intermediates=True)
  inter = state['intermediates']
  blocks = [inter['transformer'][f'resblocks_{i}']['__call__'][0] for i in range(cfg.layers)]
  return tokens, inter['ln_pre']['__call__'][0], blocks


encode = jax.jit(pe.encode_images, static_argnums=0)


def params_of(variant: str, dtype) -> dict:
  _, params = convert.load_perception(path(f'pe_spatial_reduced_{variant}_state_dict.safetensors'),
                                      config(variant), dtype=dtype)
  return params


# ---------------------------------------------------------------------------------------------
# Position encodings


@pytest.mark.parametrize('variant', VARIANTS)
def test_rope_tables_and_posemb(variant):
  cfg, ref = config(variant), io(variant)
  for case in CASES:
    gh, gw = images(variant, case).shape[1:3]
    gh, gw = gh // cfg.patch_size, gw // cfg.patch_size
    angles, cos, sin = pe.rope2d_tables(cfg, gh, gw)
    assert angles.dtype == np.float32 and angles.tobytes() == ref[f'{case}.rope_angles_fp32'].tobytes()
    # torch's float32 cos / sin are not correctly rounded everywhere; ours are: 1 ulp apart at most.
    for ours, theirs in ((cos, ref[f'{case}.rope_cos_fp32']), (sin, ref[f'{case}.rope_sin_fp32'])):
      assert np.all(np.abs(ours - theirs) <= np.spacing(np.abs(theirs)))
    rot = pe.rope2d_rotations(cfg, gh, gw, np.float64)
    assert rot.shape == (int(cfg.use_cls_token) + gh * gw, cfg.head_dim // 2, 2, 2)
    angles64 = pe.rope2d_tables(cfg, gh, gw, np.float64)[0]
    np.testing.assert_allclose(angles64, angles, rtol=1e-7, atol=0)
    np.testing.assert_array_equal(rot[:, :, 0, 0], np.cos(angles64[:, 0::2]))
    np.testing.assert_array_equal(rot[:, :, 1, 0], np.sin(angles64[:, 1::2]))
    if cfg.use_cls_token:
      np.testing.assert_array_equal(rot[0], np.broadcast_to(np.eye(2), rot[0].shape))  # CLS: angle 0
    with jax.enable_x64(True):
      pos = pe.sample_abs_posemb(cfg, jnp.asarray(state(variant)['positional_embedding']), gh, gw)
      assert max_rel(pos, ref[f'{case}.abs_posemb_sampled']) < 1e-14
  # The rotation convention: adjacent pairs, out[2k] = t[2k] cos - t[2k+1] sin (README §3).
  t = np.random.default_rng(0).normal(size=(1, cfg.head_dim))
  a = pe.rope2d_tables(cfg, gh, gw, np.float64)[0][-1:]
  want = t * np.cos(a) + np.stack([-t[:, 1::2], t[:, 0::2]], -1).reshape(t.shape) * np.sin(a)
  with jax.enable_x64(True):
    got = apply_rope(jnp.asarray(t)[:, None], pe.rope2d_rotations(cfg, gh, gw, np.float64)[-1:], round_to_float32=False)
  np.testing.assert_allclose(np.asarray(got)[:, 0], want, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Parity with the float64 goldens


@pytest.mark.parametrize('variant', VARIANTS)
def test_float64_parity(variant):
  cfg, ref = config(variant), io(variant)
  cls = int(cfg.use_cls_token)
  errors = {}
  with jax.enable_x64(True):
    params = params_of(variant, None)
    assert jax.tree.leaves(params)[0].dtype == np.float64
    for case in CASES:
      x = jnp.asarray(images(variant, case))
      gh, gw = x.shape[1] // cfg.patch_size, x.shape[2] // cfg.patch_size
      # float32 tables as torch computed them, injected (upcast exactly).
      rot = pe.rotations_from_tables(ref[f'{case}.rope_cos_fp32'], ref[f'{case}.rope_sin_fp32']).astype(np.float64)
      tokens, ln_pre, blocks = run(cfg, params, x, rot)
      assert tokens.dtype == jnp.float64
      errors[case, 'forward_out'] = max_rel(tokens, ref[f'{case}.forward_out'])
      errors[case, 'patch_features'] = max_rel(tokens[:, cls:], ref[f'{case}.patch_features'])
      errors[case, 'ln_pre'] = max_rel(ln_pre, ref[f'{case}.intermediate.ln_pre_out'])
      for i, block in enumerate(blocks):
        errors[case, f'block{i}'] = max_rel(block, ref[f'{case}.intermediate.resblocks.{i}.out'])
      # all-float64 RoPE (same compiled program: rotations are an argument).
      tokens64, _, _ = run(cfg, params, x, pe.rope2d_rotations(cfg, gh, gw, np.float64))
      errors[case, 'rope_fp64'] = max_rel(tokens64[:, cls:], ref[f'{case}.patch_features_rope_fp64'])
      assert max(errors.values()) < 1e-9, errors
      # The public entry point, with our own float32 tables: within the 1-ulp cos / sin gap.
      patch_map = encode(cfg, params, x)
      assert patch_map.shape == ref[f'{case}.patch_map'].shape and patch_map.dtype == jnp.float64
      assert max_rel(patch_map, ref[f'{case}.patch_map']) < 1e-6


@pytest.mark.parametrize('variant', VARIANTS)
def test_float32_parity(variant):
  cfg, ref = config(variant), io(variant)
  params = params_of(variant, np.float32)
  assert jax.tree.leaves(params)[0].dtype == np.float32
  for case in CASES:
    got = encode(cfg, params, jnp.asarray(images(variant, case), jnp.float32))
    assert got.dtype == jnp.float32
    assert max_rel(got, ref[f'{case}.patch_map']) < 1e-5


def test_normalize_images():
  ref = io('cls')
  with jax.enable_x64(True):
    got = pe.normalize_images(ref['native.images_uint8'], jnp.float64)
    assert np.asarray(got).tobytes() == ref['native.images'].tobytes()
  got = pe.normalize_images(ref['native.images_uint8'])
  want = (ref['native.images_uint8'].astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
  assert got.dtype == jnp.float32 and np.asarray(got).tobytes() == want.tobytes()


# ---------------------------------------------------------------------------------------------
# Full-size structure


@pytest.mark.parametrize('name', SPATIAL)
def test_full_size_manifest(name):
  cfg, info = pe.PE_PRESETS[name], manifest(name)
  entries = {e['key']: tuple(e['shape']) for e in info['state_dict']}
  abstract = jax.eval_shape(lambda: pe.init_perception(cfg))
  assert torch_shapes(abstract) == entries
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))
  assert count == info['total_state_dict_numel'] == PARAM_COUNTS[name]
  raw = info['config']
  assert (cfg.width, cfg.layers, cfg.heads, cfg.patch_size, cfg.image_size, cfg.use_cls_token, cfg.layer_scale,
          cfg.mlp_width) == (raw['width'], raw['layers'], raw['heads'], raw['patch_size'], raw['image_size'],
                             raw['use_cls_token'], raw['ls_init_value'] is not None, info['mlp_width'])
  fake = {k: np.broadcast_to(np.float32(0), s) for k, s in entries.items()}
  assert convert.infer_perception_config(fake) == cfg
  prefixed = convert.unwrap_perception_state_dict({f'module.visual.{k}': v for k, v in fake.items()})
  assert convert.infer_perception_config(prefixed) == cfg


def test_config_inference_fallback():
  """Off-preset widths get head_dim 64; the reduced fixtures (head_dim 16) need an explicit config."""
  for variant in VARIANTS:
    got = convert.infer_perception_config(state(variant))
    assert got == dataclasses.replace(config(variant), heads=1)
  with pytest.raises(CheckpointError, match='conv1.weight'):
    convert.infer_perception_config({'positional_embedding': np.zeros((17, 64))})


# ---------------------------------------------------------------------------------------------
# Checkpoint import


def assert_same(a: dict, b: dict) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def test_pth_and_safetensors_load_identically():
  cfg = config('ls')
  got_cfg, from_pth = convert.load_perception(path('pe_spatial_reduced_ls_state_dict.pth'), cfg, dtype=None)
  assert got_cfg == cfg
  assert_same(from_pth, params_of('ls', None))
  # float32 by default
  _, p32 = convert.load_perception(path('pe_spatial_reduced_ls_state_dict.pth'), cfg)
  assert {leaf.dtype for leaf in jax.tree.leaves(p32)} == {np.dtype(np.float32)}


def wrap_pth(src, dst, wrapper: str) -> None:
  """Re-save a torch.save zip with its dict nested as {wrapper: dict, 'epoch': 3} (pickle splice)."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w') as zout:
    for item in zin.infolist():
      data = zin.read(item)
      if item.filename.endswith('/data.pkl'):
        assert data[:2] == b'\x80\x02' and data[-1:] == b'.'
        def text(s):
          return b'X' + len(s).to_bytes(4, 'little') + s.encode()
        data = (b'\x80\x02}(' + text(wrapper) + data[2:-1] + text('epoch') + b'K\x03u.')
      zout.writestr(item, data)


@pytest.mark.parametrize('wrapper', ['state_dict', 'weights'])
def test_wrapped_and_prefixed_checkpoints(tmp_path, wrapper):
  cfg, sd = config('ls'), state('ls')
  want = params_of('ls', None)
  wrapped = tmp_path / 'wrapped.pth'
  wrap_pth(path('pe_spatial_reduced_ls_state_dict.pth'), wrapped, wrapper)
  assert_same(convert.load_perception(wrapped, cfg, dtype=None)[1], want)
  assert_same(convert.load_perception(wrapped, cfg, key=wrapper, dtype=None)[1], want)
  with pytest.raises(CheckpointError, match='not found'):
    convert.load_perception(wrapped, cfg, key='model')
  for prefix in ('module.', 'visual.', 'module.visual.'):
    file = tmp_path / f'{prefix}safetensors'
    extra = {'token_embedding.weight': np.zeros((4, 8)), 'ln_final.weight': np.ones(8)} if 'visual' in prefix else {}
    write_safetensors({f'{prefix}{k}': v for k, v in sd.items()} | extra, file)
    assert_same(convert.load_perception(file, cfg, dtype=None)[1], want)


def test_bad_checkpoints(tmp_path):
  cfg, sd = config('cls'), state('cls')
  key = 'transformer.resblocks.1.mlp.c_fc.bias'
  with pytest.raises(CheckpointError, match=f'missing keys.*{key}'):
    convert.state_dict_to_perception_params({k: v for k, v in sd.items() if k != key}, cfg)
  with pytest.raises(CheckpointError, match=f'wrong shapes.*{key}'):
    convert.state_dict_to_perception_params(sd | {key: sd[key][:-1]}, cfg)
  with pytest.raises(CheckpointError, match='unexpected keys.*transformer.resblocks.0.ls_1.gamma'):
    convert.state_dict_to_perception_params(sd | {'transformer.resblocks.0.ls_1.gamma': np.ones(64)}, cfg)
  bad = dict(sd)
  bad[key] = sd[key].copy()
  bad[key][3] = np.nan
  file = tmp_path / 'nan.safetensors'
  write_safetensors(bad, file)
  with pytest.raises(CheckpointError, match=f'nan.safetensors: non-finite values in {key}'):
    convert.load_perception(file, cfg)
  core = {f'visual.{k}': v for k, v in sd.items()} | {'visual.proj': np.ones((64, 32)),
                                                     'visual.attn_pool.probe': np.ones((1, 1, 64))}
  with pytest.raises(CheckpointError, match='PE-Core.*attn_pool.probe, proj'):
    convert.state_dict_to_perception_params(core, cfg)
  with pytest.raises(ValueError, match='unknown Perception Encoder preset'):
    convert.state_dict_to_perception_params(sd, 'PE-Spatial-X')
  params = params_of('cls', np.float32)
  with pytest.raises(ValueError, match=r'\(B, H, W, 3\)'):
    pe.encode_images(cfg, params, jnp.zeros((1, 3, 64, 64)))
  with pytest.raises(ValueError, match='smaller than one'):
    pe.encode_images(cfg, params, jnp.zeros((1, 8, 64, 3)))


# ---------------------------------------------------------------------------------------------
# Demo preset and FLOPs


def test_tiny_preset_is_seeded():
  cfg = pe.PE_PRESETS['tiny']
  a, b, c = pe.init_perception(cfg, 0), pe.init_perception(cfg, 0), pe.init_perception(cfg, 1)
  assert_same(jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))
  assert not np.array_equal(a['conv1']['kernel'], c['conv1']['kernel'])
  x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1, maxval=1)
  out = encode(cfg, a, x)
  assert out.shape == (2, 4, 4, 32) and out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())


def test_flops():
  """Sanity formula: every block weight is used once per token (2 * params_in_blocks * tokens), plus
  q k^T and p v (4 * layers * tokens^2 * width), plus the patchify conv (2 * conv params * patches)."""
  cfg = pe.PE_SPATIAL_B16_512
  abstract = jax.eval_shape(lambda: pe.init_perception(cfg))
  block_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract['transformer']))
  n = 14 * 14 + 1
  sanity = 2 * block_params * n + 4 * cfg.layers * n * n * cfg.width + 2 * 3 * 16 * 16 * cfg.width * 14 * 14
  flops = pe.perception_flops(cfg, 224, 224)
  assert abs(flops / sanity - 1) < 0.05
  assert pe.perception_flops(cfg, 239, 239) == flops  # the floor in the patchify conv
