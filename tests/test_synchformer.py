"""Synchformer visual branch (MMAudio's sync_f): parity, checkpoint import, segmenting, demo preset.

Golden data: tests/fixtures/visual/synchformer (copied from shared/fixtures/visual/synchformer; its
README §1 describes every tensor): `synchformer_reduced_state_dict.{pth,safetensors}` (random
float64 weights, keys `vfeat_extractor.*`), `synchformer_reduced_io.safetensors` (inputs, outputs and
intermediates of the official float64 PyTorch run), `synchformer_reduced_config.json` and
`synchformer_full_manifest.json` (the 238 keys / 122,440,704 params of the real model). The
fixtures' frames are (B, T, C, H, W); ours are channels-last.
Tolerances: max |err| / max |ref|: float64 < 1e-9 (measured ~1e-15), float32 < 1e-5.
"""
from __future__ import annotations

import functools
import json
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from conftest import fixture_path
from visaudio_jax.convert import synchformer as convert
from visaudio_jax.convert.torch_io import CheckpointError
from visaudio_jax.encoders import synchformer as sf

DIR = ('visual', 'synchformer')
STATE = 'synchformer_reduced_state_dict'


def fixture(name: str):
  return fixture_path(*DIR, name)


@functools.cache
def io() -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(fixture('synchformer_reduced_io.safetensors')))


@functools.cache
def reduced_config() -> sf.SynchformerConfig:
  c = json.loads(fixture('synchformer_reduced_config.json').read_text())
  return sf.SynchformerConfig(img_size=c['TRAIN_CROP_SIZE'], patch_size=c['PATCH_SIZE'],
                              temporal_patch=c['PATCH_SIZE_TEMP'], embed_dim=c['EMBED_DIM'], depth=c['DEPTH'],
                              num_heads=c['NUM_HEADS'], mlp_ratio=c['MLP_RATIO'], frames_per_segment=c['NUM_FRAMES'],
                              epsilon=c['layer_norm_eps'])


@functools.cache
def reduced_params() -> dict:
  return convert.load_synchformer(fixture(f'{STATE}.safetensors'), reduced_config())[1]


@functools.cache
def raw_state() -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(fixture(f'{STATE}.safetensors')))


def channels_last(video: np.ndarray) -> np.ndarray:  # (..., C, H, W) -> (..., H, W, C)
  return np.moveaxis(video, -3, -1)


def max_rel(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(got - ref).max() / np.abs(ref).max())


def _run(dtype):
  """encode_video on the fixture video, plus the sown intermediates of the same segments."""
  cfg = reduced_config()
  idx = io()['segment_frame_index']
  assert np.array_equal(idx, sf.segment_indices(cfg, io()['video'].shape[1]))

  @jax.jit
  def run(params, video):
    feats = sf.encode_video(cfg, params, video)
    segments = jnp.stack([video[:, i:i + 16] for i in idx[:, 0]], axis=1).reshape((-1, 16) + video.shape[2:])
    _, state = sf.MotionFormer(cfg).apply({'params': params}, segments, mutable=['intermediates'])
    return feats, state['intermediates']

  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), reduced_params())
  feats, inter = run(params, jnp.asarray(channels_last(io()['video']), dtype))
  assert feats.dtype == dtype
  inter = {k.replace('blocks_', 'blocks.'): v[0] for k, v in traverse_util.flatten_dict(inter, sep='.').items()}
  return feats, inter


def _errors(feats, inter) -> dict[str, float]:
  ref = io()
  b, s, t, d = ref['synchformer_out'].shape
  errs = {'features': max_rel(feats, ref['features']),
          'synchformer_out': max_rel(np.asarray(feats).reshape(b, s, t, d), ref['synchformer_out'])}
  names = [k[len('intermediate.'):] for k in ref if k.startswith('intermediate.')]
  assert len(names) == 8 and set(names) <= set(inter), sorted(set(names) - set(inter))
  errs.update({n: max_rel(inter[n], ref[f'intermediate.{n}']) for n in names})
  return errs


def test_float64_parity():
  with jax.enable_x64(True):
    errs = _errors(*_run(jnp.float64))
    assert np.abs(np.asarray(sf.normalize_frames(io()['frames_uint8'], jnp.float64)) - io()['video']).max() < 5e-16
  print('float64 max rel errors', {k: f'{v:.1e}' for k, v in errs.items()})
  assert max(errs.values()) < 1e-9, errs


def test_float32_parity_and_normalize():
  feats, _ = _run(jnp.float32)
  err = max_rel(feats, io()['features'])
  print(f'float32 max rel error {err:.1e}')
  assert err < 1e-5
  # bfloat16 compute (MMAudio's default outside --full_precision): same path, ~1e-2 relative.
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), reduced_params())
  video = jnp.asarray(channels_last(io()['video']), jnp.float32)
  bf16 = jax.jit(functools.partial(sf.encode_video, reduced_config(), dtype=jnp.bfloat16))(params, video)
  assert bf16.dtype == jnp.bfloat16 and max_rel(bf16, io()['features']) < 3e-2
  frames = sf.normalize_frames(io()['frames_uint8'])
  assert frames.dtype == jnp.float32 and np.abs(np.asarray(frames, np.float64) - io()["video"]).max() < 2.5e-7  # 2 ulp


def test_full_size_manifest():
  manifest = json.loads(fixture('synchformer_full_manifest.json').read_text())
  entries = {e['key']: tuple(e['shape']) for e in manifest['state_dict']}
  assert len(entries) == manifest['num_state_dict_entries'] == 238
  assert convert.synchformer_state_dict_shapes(sf.SYNCHFORMER) == entries
  abstract = jax.eval_shape(lambda: sf.init_synchformer(sf.SYNCHFORMER))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == manifest['total_state_dict_numel'] == 122_440_704
  # Config inference from shapes alone (zero-stride arrays cost no memory); other branches ignored.
  fake = {k: np.broadcast_to(np.float32(0), s) for k, s in entries.items()}
  fake.update({'afeat_extractor.patch_embed.proj.weight': np.zeros((4, 1, 16, 16), np.float32),
               'transformer.0.weight': np.zeros((3,), np.float32)})
  config, params = convert.state_dict_to_synchformer_params(fake)
  assert config == sf.SYNCHFORMER
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, abstract)


def _nest(src, dst, key: bytes):
  """Rewrite a torch.save zip so its dict sits under `key` (e.g. a Lightning-style 'state_dict')."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w') as zout:
    for entry in zin.namelist():
      data = zin.read(entry)
      if entry.endswith('/data.pkl'):
        assert data[:2] == b'\x80\x02' and data[-1:] == b'.'  # PROTO 2 ... STOP
        data = b'\x80\x02}X' + struct.pack('<I', len(key)) + key + data[2:-1] + b's.'
      zout.writestr(entry, data)


def test_pth_safetensors_nested_and_inference(tmp_path):
  ref = reduced_params()
  for wrap in ('state_dict', 'model'):
    _nest(fixture(f'{STATE}.pth'), tmp_path / f'{wrap}.pth', wrap.encode())
  for path in (fixture(f'{STATE}.pth'), tmp_path / 'state_dict.pth', tmp_path / 'model.pth'):
    config, got = convert.load_synchformer(path, reduced_config())
    assert config == reduced_config()
    assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b), got, ref))
  with pytest.raises(CheckpointError, match='not found'):
    convert.load_synchformer(tmp_path / 'model.pth', key='ema')
  # Shapes give everything but the heads (64 wide: 64 // 64 = 1 head; the fixture has 4).
  config, _ = convert.load_synchformer(fixture(f'{STATE}.safetensors'))
  assert config.num_heads == 1 and config == sf.SynchformerConfig(**{**vars(reduced_config()), 'num_heads': 1})
  # Keys outside vfeat_extractor (audio branch, sync head) are ignored.
  extra = {**raw_state(), 'afeat_extractor.cls_token': np.ones((1, 1, 8)), 'transformer.out.weight': np.ones(3)}
  _, got = convert.state_dict_to_synchformer_params(extra, reduced_config())
  assert jax.tree.all(jax.tree.map(np.array_equal, got, ref))
  # Params: prefix stripped, the unused 2D patch_embed kept (torch layout -> HWIO).
  assert ref['patch_embed']['proj']['kernel'].shape == (16, 16, 3, 64) and 'vfeat_extractor' not in ref


def test_bad_checkpoints(tmp_path):
  state = raw_state()
  cfg = reduced_config()
  key = 'vfeat_extractor.blocks.1.timeattn.qkv.weight'
  missing = {k: v for k, v in state.items() if k != key}
  safetensors.numpy.save_file(missing, tmp_path / 'missing.safetensors')
  with pytest.raises(CheckpointError, match=r'missing keys.*blocks\.1\.timeattn\.qkv\.weight'):
    convert.load_synchformer(tmp_path / 'missing.safetensors', cfg)
  with pytest.raises(CheckpointError, match=r'blocks\.1\.timeattn\.qkv\.weight: \(192, 60\)'):
    convert.state_dict_to_synchformer_params({**state, key: state[key][:, :60]}, cfg)
  nan = state[key].copy()
  nan[3, 5] = np.nan
  with pytest.raises(CheckpointError, match=r'non-finite values in vfeat_extractor\.blocks\.1\.timeattn\.qkv\.weight'):
    convert.state_dict_to_synchformer_params({**state, key: nan}, cfg)
  with pytest.raises(CheckpointError, match='no vfeat_extractor'):
    convert.state_dict_to_synchformer_params({k[len('vfeat_extractor.'):]: v for k, v in state.items()}, cfg)
  with pytest.raises(CheckpointError, match='pos_embed is missing'):
    convert.state_dict_to_synchformer_params({k: v for k, v in state.items() if not k.endswith('pos_embed')})
  with pytest.raises(CheckpointError, match='not a Synchformer visual branch'):  # the real config on the reduced file
    convert.load_synchformer(fixture(f'{STATE}.safetensors'), 'synchformer')


def test_short_video_and_bad_shapes():
  cfg, params = sf.TINY_SYNCHFORMER, sf.init_synchformer(sf.TINY_SYNCHFORMER)
  with pytest.raises(ValueError, match='at least 16 frames.*got 15'):
    sf.encode_video(cfg, params, jnp.zeros((1, 15, 32, 32, 3)))
  with pytest.raises(ValueError, match='expected segments'):
    sf.encode_segments(cfg, params, jnp.zeros((1, 16, 3, 32, 32)))  # channels-first


def test_tiny_preset_is_seeded_and_segments_a_2s_clip():
  cfg = sf.TINY_SYNCHFORMER
  a, b, c = sf.init_synchformer(cfg, 0), sf.init_synchformer(cfg, 0), sf.init_synchformer(cfg, 1)
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert not np.array_equal(a['blocks_0']['attn']['qkv']['kernel'], c['blocks_0']['attn']['qkv']['kernel'])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(a))
  frames = np.random.default_rng(0).integers(0, 256, (2, 50, 32, 32, 3), np.uint8)  # 2 s at 25 fps
  feats = jax.jit(functools.partial(sf.encode_video, cfg))(a, sf.normalize_frames(frames))
  assert feats.shape == (2, 40, 48) and feats.dtype == jnp.float32 and np.isfinite(np.asarray(feats)).all()
  assert cfg.num_segments(50) == 5 and cfg.num_segments(200) == 24  # MMAudio's 8 s: 192 = 24 * 8 vectors
  # Segment 1 (frames 8..23) of clip 0 alone gives the same 8 vectors.
  alone = jax.jit(functools.partial(sf.encode_segments, cfg))(a, sf.normalize_frames(frames[:1, 8:24]))
  assert max_rel(alone[0], feats[0, 8:16]) < 1e-5
