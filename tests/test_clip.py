"""DFN5B CLIP ViT-H/14 (both towers, as MMAudio runs them), its checkpoint import and the CLIP BPE
tokenizer.

Golden data: tests/fixtures/visual/clip (copied from shared/fixtures/visual/clip; its README §2
describes every tensor), written by open_clip 3.3.0 with MMAudio's patched `encode_text`:
  * `clip_reduced_state_dict.{safetensors,pth}`: a reduced open_clip CLIP (float64, random weights;
    config in `clip_reduced_config.json`: a 42 px / patch 14 vision tower fed 48 px images, vocab
    1000 with sot 998 / eot 999);
  * `clip_reduced_io.safetensors`: its inputs (uint8 / [0, 1] / normalised frames (B, T, 3, H, W),
    `text_tokens`), the MMAudio outputs `image_features` (clip_f) and `text_token_features`
    (text_f), both before L2 normalisation, and intermediate activations, all float64;
  * `clip_full_manifest.json`: every key and shape of the real DFN5B ViT-H-14-378-quickgelu;
  * `clip_tokenizer_ids.safetensors` (7 strings in its metadata `strings_json`) and
    `clip_tokenizer_facts.json`: the real tokenizer's ids.
Tolerances: float64 within 1e-9 of the references (max abs error / max abs reference; measured
~1e-15), float32 within 1e-5 (measured ~5e-7).
"""
from __future__ import annotations

import functools
import json
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from conftest import fixture_path
from visaudio_jax.convert import clip as convert_clip
from visaudio_jax.convert.state_dict import torch_shapes
from visaudio_jax.convert.torch_io import CheckpointError, write_safetensors
from visaudio_jax.encoders import clip as clip_lib
from visaudio_jax.encoders.clip import CLIP, DFN5B_H14_384, TINY_CLIP, CLIPConfig
from visaudio_jax.encoders.tokenizer import ClipTokenizer


def path(name: str):
  return fixture_path('visual', 'clip', name)


@functools.cache
def io() -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(path('clip_reduced_io.safetensors')))


@functools.cache
def reduced_config() -> CLIPConfig:
  """The open_clip `model_cfg` of the fixture as a CLIPConfig (heads are not in the shapes)."""
  cfg = json.loads(path('clip_reduced_config.json').read_text())['open_clip_model_cfg']
  vision, text = cfg['vision_cfg'], cfg['text_cfg']
  assert cfg['quick_gelu']
  return CLIPConfig(
      embed_dim=cfg['embed_dim'], image_size=vision['image_size'], patch_size=vision['patch_size'],
      vision_width=vision['width'], vision_layers=vision['layers'],
      vision_heads=vision['width'] // vision['head_width'], vision_mlp_ratio=vision.get('mlp_ratio', 4.0),
      context_length=text['context_length'], vocab_size=text['vocab_size'], text_width=text['width'],
      text_heads=text['heads'], text_layers=text['layers'])


@functools.cache
def reduced_state() -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(path('clip_reduced_state_dict.safetensors')))


@functools.cache
def reduced_params():
  return convert_clip.load_clip(path('clip_reduced_state_dict.safetensors'), reduced_config())[1]


def channels_last(frames: np.ndarray) -> np.ndarray:
  return np.moveaxis(frames, -3, -1)  # (..., 3, H, W) -> (..., H, W, 3)


def max_rel(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  return float(np.abs(got - ref).max() / np.abs(ref).max())


def run_reduced(dtype):
  """The MMAudio outputs (public API) and the intermediates (one captured apply), in one jit."""
  cfg = reduced_config()
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), reduced_params())

  @jax.jit
  def run(params, frames, tokens):
    images = clip_lib.normalize_images(frames)
    _, state = CLIP(cfg).apply({'params': params}, images.reshape((-1,) + images.shape[-3:]), tokens,
                               capture_intermediates=True)
    return {'frames_normalized': images,
            'image_features': clip_lib.encode_images(cfg, params, images),
            'text_token_features': clip_lib.encode_text(cfg, params, tokens)}, state['intermediates']

  frames = io()['frames'] if dtype == jnp.float64 else io()['frames_uint8']
  return run(params, channels_last(frames), io()['text_tokens'])


def intermediates(captured) -> dict[str, jax.Array]:
  """Our captured module outputs under the fixture's names (channels-first conv1 like torch's)."""
  v, t = captured['visual'], captured
  out = {
      'image_features_unnormalized': v['__call__'][0],
      'text_token_features_unnormalized': t['ln_final']['__call__'][0],
      'intermediate.visual.conv1_out': jnp.moveaxis(v['conv1']['__call__'][0], -1, 1),
      'intermediate.visual.ln_pre_out': v['ln_pre']['__call__'][0],
      'intermediate.visual.pooled_after_ln_post': v['ln_post']['__call__'][0],
  }
  for i in range(2):
    out[f'intermediate.visual.resblocks.{i}.out'] = v['transformer'][f'resblocks_{i}']['__call__'][0]
    out[f'intermediate.text.resblocks.{i}.out'] = t['transformer'][f'resblocks_{i}']['__call__'][0]
  return out


def test_float64_parity_with_open_clip():
  ref = io()
  with jax.enable_x64(True):
    outputs, captured = run_reduced(jnp.float64)
    assert outputs['image_features'].dtype == jnp.float64
    errors = {k: max_rel(v, ref[k]) for k, v in outputs.items() if k != 'frames_normalized'}
    errors['frames_normalized'] = max_rel(outputs['frames_normalized'], channels_last(ref['frames_normalized']))
    b, t = ref['frames'].shape[:2]
    for k, v in intermediates(captured).items():
      if k.startswith('intermediate.visual.') or k == 'image_features_unnormalized':
        v = np.asarray(v).reshape(ref[k].shape)
      errors[k] = max_rel(v, ref[k])
  print('float64 max rel errors:', {k: f'{e:.1e}' for k, e in errors.items()})
  assert len(errors) == 12
  assert max(errors.values()) < 1e-9, errors
  assert outputs['image_features'].shape == (b, t, 40)
  assert outputs['text_token_features'].shape == (4, 77, 48)  # text width, not embed_dim: no projection


def test_float32_parity_with_open_clip():
  outputs, _ = run_reduced(jnp.float32)
  assert outputs['image_features'].dtype == jnp.float32
  errors = {k: max_rel(v, io()[k]) for k, v in outputs.items() if k != 'frames_normalized'}
  errors['frames_normalized'] = max_rel(outputs['frames_normalized'], channels_last(io()['frames_normalized']))
  print('float32 max rel errors:', {k: f'{e:.1e}' for k, e in errors.items()})
  assert max(errors.values()) < 1e-5, errors
  norms = np.linalg.norm(np.asarray(outputs['text_token_features'], np.float64), axis=-1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-6)


def test_tokenizer_matches_open_clip():
  file = path('clip_tokenizer_ids.safetensors')
  ids = safetensors.numpy.load_file(str(file))['token_ids']
  with safetensors.safe_open(str(file), 'np') as f:
    strings = json.loads(f.metadata()['strings_json'])
  facts = json.loads(path('clip_tokenizer_facts.json').read_text())
  tok = ClipTokenizer()
  got = tok(strings)
  assert got.dtype == np.int64 and got.shape == (7, 77)
  np.testing.assert_array_equal(got, ids)
  assert (tok.sot_token_id, tok.eot_token_id, tok.pad_token_id, tok.vocab_size) == (
      facts['sot_token_id'], facts['eot_token_id'], facts['pad_token_id'], facts['vocab_size'])
  for example in facts['examples']:
    row = tok(example['text'], context_length=facts['context_length'])
    np.testing.assert_array_equal(row, [example['ids']])
    assert np.count_nonzero(row) == example['num_nonpad']
  assert tok(strings[-1])[0, -1] == tok.eot_token_id  # truncated, still ends in eot
  np.testing.assert_array_equal(tok('', context_length=4), [[49406, 49407, 0, 0]])  # empty_string_feat's ids
  np.testing.assert_array_equal(tok('a dog barking', context_length=3), [[49406, 320, 49407]])
  assert tok.decode(ids[1][:5]) == '<start_of_text>a dog barking <end_of_text>'


def test_full_size_manifest():
  manifest = json.loads(path('clip_full_manifest.json').read_text())
  expected = {e['key']: tuple(e['shape']) for e in manifest['state_dict']}
  abstract = jax.eval_shape(lambda: clip_lib.init_clip(DFN5B_H14_384))
  shapes = torch_shapes(abstract, embeddings=('token_embedding',))
  assert shapes == expected
  assert sum(int(np.prod(s)) for s in shapes.values()) == manifest['total_state_dict_numel'] == 986_714_881
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract))
  assert DFN5B_H14_384.grid_size == 27 and DFN5B_H14_384.vision_width // DFN5B_H14_384.vision_heads == 80
  fake = {k: np.broadcast_to(np.float32(0), s) for k, s in expected.items()}
  assert convert_clip.infer_clip_config(fake) == DFN5B_H14_384


def test_pth_and_safetensors_load_identically(tmp_path):
  cfg = reduced_config()
  c1, p1 = convert_clip.load_clip(path('clip_reduced_state_dict.safetensors'), cfg)
  c2, p2 = convert_clip.load_clip(path('clip_reduced_state_dict.pth'), cfg)
  assert c1 == c2 == cfg
  assert jax.tree.structure(p1) == jax.tree.structure(p2)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    assert a.dtype == b.dtype == np.float64 and np.array_equal(a, b)
  # torch layout -> ours
  state = reduced_state()
  np.testing.assert_array_equal(p1['visual']['conv1']['kernel'], state['visual.conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p1['visual']['transformer']['resblocks_1']['attn']['in_proj']['kernel'],
                                state['visual.transformer.resblocks.1.attn.in_proj_weight'].T)
  np.testing.assert_array_equal(p1['visual']['proj'], state['visual.proj'])  # used as x @ P
  np.testing.assert_array_equal(p1['token_embedding']['embedding'], state['token_embedding.weight'])
  # Shape inference: the head counts are a guess (open_clip conventions) for non-preset shapes.
  with pytest.warns(UserWarning, match='no CLIP preset'):
    inferred = convert_clip.infer_clip_config(state)
  assert inferred == CLIPConfig(**{**cfg.__dict__, 'vision_heads': 1, 'text_heads': 8})
  # A training checkpoint: {'state_dict': ..., 'epoch': 3}, read under 'state_dict' by default.
  _, p3 = convert_clip.load_clip(wrap_pth(path('clip_reduced_state_dict.pth'), tmp_path / 'wrapped.pth'), cfg)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p3)))
  # DDP's 'module.' prefix is stripped.
  prefixed = tmp_path / 'ddp.safetensors'
  write_safetensors({f'module.{k}': v for k, v in state.items()}, prefixed)
  _, p4 = convert_clip.load_clip(prefixed, cfg)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)))


def wrap_pth(src, dst):
  """Rewrite a torch.save zip of a state dict as one of {'state_dict': <it>, 'epoch': 3}, splicing
  the pickle (protocol 2: header b'\\x80\\x02', then the dict, then STOP)."""
  with zipfile.ZipFile(src) as archive, zipfile.ZipFile(dst, 'w') as out:
    for name in archive.namelist():
      data = archive.read(name)
      if name.endswith('/data.pkl'):
        assert data[:2] == pickle.PROTO + b'\x02' and data[-1:] == pickle.STOP
        item = lambda obj: pickle.dumps(obj, protocol=2)[2:-1]
        data = (data[:2] + pickle.EMPTY_DICT + pickle.MARK + item('state_dict') + data[2:-1] +
                item('epoch') + item(3) + pickle.SETITEMS + pickle.STOP)
      out.writestr(name, data)
  return dst


@pytest.mark.parametrize('damage', ['missing', 'extra', 'shape', 'nan'])
def test_bad_checkpoints_are_rejected(tmp_path, damage):
  state = dict(reduced_state())
  key = 'visual.transformer.resblocks.1.mlp.c_fc.bias'
  if damage == 'missing':
    del state[key]
  elif damage == 'extra':
    key = 'visual.attn_pool.probe'
    state[key] = np.zeros((1, 64))
  elif damage == 'shape':
    state[key] = np.zeros((255,))
  else:
    state[key] = state[key].copy()
    state[key][3] = np.nan
  bad = tmp_path / 'bad.safetensors'
  write_safetensors(state, bad)
  with pytest.raises(CheckpointError, match=r'bad\.safetensors.*' + key.replace('.', r'\.')):
    convert_clip.load_clip(bad, reduced_config())
  if damage == 'missing':  # also without a config: inference still runs, the check names the key
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=key.replace('.', r'\.')):
      convert_clip.load_clip(bad)


def test_bad_inputs_are_rejected():
  cfg = reduced_config()
  params = reduced_params()
  with pytest.raises(ValueError, match='channels-last'):
    clip_lib.encode_images(cfg, params, np.zeros((2, 48, 48, 4), np.float32))
  with pytest.raises(ValueError, match='channels-last'):
    clip_lib.encode_images(cfg, params, np.zeros((2, 3, 48, 48), np.float32))  # channels-first
  with pytest.raises(ValueError, match='channels-last'):
    clip_lib.normalize_images(np.zeros((2, 3, 48, 48), np.uint8))
  with pytest.raises(ValueError, match='patch grid'):
    clip_lib.encode_images(cfg, params, np.zeros((2, 56, 56, 3), np.float32))
  with pytest.raises(ValueError, match='at most 77'):
    clip_lib.encode_text(cfg, params, np.zeros((1, 78), np.int32))
  with pytest.raises(ValueError, match='not divisible'):
    CLIPConfig(**{**cfg.__dict__, 'text_heads': 5})
  with pytest.raises(ValueError):
    convert_clip.load_clip(path('clip_reduced_state_dict.safetensors'), 'no_such_preset')


def test_tiny_clip_is_seeded_and_has_the_expected_shapes():
  a, b = clip_lib.init_clip(TINY_CLIP, seed=3), clip_lib.init_clip(TINY_CLIP, seed=3)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  c = clip_lib.init_clip(TINY_CLIP, seed=4)
  assert not np.array_equal(a['visual']['proj'], c['visual']['proj'])
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(a))
  frames = np.random.default_rng(0).integers(0, 256, (2, 3, 35, 33, 3), np.uint8)  # (B, T, H, W, 3); 32 x 32 px are used
  tokens = ClipTokenizer()(['a dog barking', ''], context_length=TINY_CLIP.context_length)
  image = jax.jit(functools.partial(clip_lib.encode_images, TINY_CLIP))(a, clip_lib.normalize_images(frames))
  text = jax.jit(functools.partial(clip_lib.encode_text, TINY_CLIP))(a, tokens)
  assert image.shape == (2, 3, 64) and image.dtype == jnp.float32
  assert text.shape == (2, 16, 64) and text.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1.0, atol=1e-5)
