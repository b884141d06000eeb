"""BigVGAN vocoders (visaudio_jax.audio.vocoder, visaudio_jax.convert.bigvgan) against PyTorch goldens.

Fixtures: tests/fixtures/mmaudio_audio/vocoder/ ({bigvgan16k,bigvgan44k_v2,bigvgan16k_snake_amp2}
_{wn,fused,io}.safetensors, bigvgan16k_snake_amp2_wn.pth, antialias_filter.safetensors), the configs
in tests/fixtures/mmaudio_audio/configs.json and the full-size meta-device manifests in
tests/fixtures/mmaudio_audio/manifests/bigvgan{16k,44k_v2}_full.json, copied from
shared/fixtures/mmaudio_audio (its README describes them). Reduced random-weight models built from
the official classes. float64 must match to max|diff| / max|ref| < 1e-10; float32 to atol 1e-4.
"""
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
from visaudio_jax.audio.vocoder import (ANTIALIAS_FILTER, BIGVGAN_16K, BIGVGAN_V2_44K, VocoderConfig,
                                        init_vocoder, kaiser_sinc_filter, vocode)
from visaudio_jax.convert.bigvgan import (expected_state_dict_shapes, load_vocoder,
                                          state_dict_to_vocoder_params)
from visaudio_jax.convert.torch_io import CheckpointError

NAMES = ('bigvgan16k', 'bigvgan44k_v2', 'bigvgan16k_snake_amp2')
FULL = {'bigvgan16k': BIGVGAN_16K, 'bigvgan44k_v2': BIGVGAN_V2_44K}
F64_RTOL, F32_ATOL = 1e-10, 1e-4


def vocoder_file(name: str):
  return fixture_path('mmaudio_audio', 'vocoder', name)


@functools.cache
def fixture_config(name: str) -> VocoderConfig:
  configs = json.loads(fixture_path('mmaudio_audio', 'configs.json').read_text())
  return VocoderConfig(**configs['vocoders'][name]['config'])


@functools.cache
def _load(file: str) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(vocoder_file(file)))


def state(name: str, form: str) -> dict[str, np.ndarray]:
  """A fresh (shallow) copy of a fixture state dict, safe to edit."""
  return dict(_load(f'{name}_{form}.safetensors'))


@functools.cache
def forward(config: VocoderConfig, dtype: str):
  return jax.jit(functools.partial(vocode, config, dtype=jnp.dtype(dtype)))


def run(config, params, mel_ncw: np.ndarray, dtype: str) -> np.ndarray:
  """Our vocoder on a torch-layout mel (B, n_mels, T): (B, T * hop)."""
  params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
  return np.asarray(forward(config, dtype)(params, jnp.asarray(mel_ncw.transpose(0, 2, 1), dtype)))


def max_rel(got, ref) -> float:
  return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


def test_antialias_filter():
  ref = _load('antialias_filter.safetensors')['kaiser_sinc_filter_f32']
  assert ANTIALIAS_FILTER.dtype == np.float32
  assert ANTIALIAS_FILTER.view(np.uint32).tolist() == ref.view(np.uint32).tolist()  # bitwise
  computed = kaiser_sinc_filter(0.25, 0.3, 12)
  assert computed.dtype == np.float64 and np.abs(computed - ANTIALIAS_FILTER).max() < 1e-7


@pytest.mark.parametrize('name', NAMES)
def test_float64_parity(name):
  """Weight-normed checkpoint, folded by our importer; config inferred except for snake_amp2."""
  explicit = name == 'bigvgan16k_snake_amp2'  # non-standard dilations and linear-scale Snake
  config, params = state_dict_to_vocoder_params(state(name, 'wn'), fixture_config(name) if explicit else None)
  assert config == fixture_config(name)
  io = _load(f'{name}_io.safetensors')
  with jax.enable_x64(True):
    wave = run(config, params, io['mel_in_f64'], 'float64')
    assert wave.shape == io['wave_f64'][:, 0].shape == (2, io['mel_in_f64'].shape[2] * config.hop_length)
    err = max_rel(wave, io['wave_f64'][:, 0])
    print(f'{name} float64 max rel error {err:.2e}')
    assert err < F64_RTOL
    if name == 'bigvgan16k':  # the VAE-decoded mel of the chain test
      err = max_rel(run(config, params, io['chain_mel_in_f64'], 'float64'), io['chain_wave_f64'][:, 0])
      print(f'{name} chain float64 max rel error {err:.2e}')
      assert err < F64_RTOL


@pytest.mark.parametrize('name', NAMES)
def test_float32_parity(name):
  """The fused float64 weights cast to float32, as the golden float32 run did."""
  _, params = state_dict_to_vocoder_params(state(name, 'fused'), fixture_config(name))
  io = _load(f'{name}_io.safetensors')
  wave = run(fixture_config(name), params, io['mel_in_f32'], 'float32')
  assert wave.dtype == np.float32
  err = np.abs(wave - io['wave_f32'][:, 0]).max()
  print(f'{name} float32 max abs error {err:.2e}')
  assert err < F32_ATOL


@pytest.mark.parametrize('name', NAMES)
def test_weight_norm_folding(name):
  config = fixture_config(name)
  _, folded = state_dict_to_vocoder_params(state(name, 'wn'), config)
  _, fused = state_dict_to_vocoder_params(state(name, 'fused'), config)
  folded, fused = traverse_util.flatten_dict(folded), traverse_util.flatten_dict(fused)
  assert folded.keys() == fused.keys()
  for path, ref in fused.items():
    assert folded[path].dtype == np.float64 and folded[path].shape == ref.shape, path
    assert max_rel(folded[path], ref) < 1e-12, path
  # NVIDIA's legacy weight_norm names (what the manifests' legacy_weightnorm_key_map lists).
  legacy = {k.replace('.parametrizations.weight.original0', '.weight_g')
            .replace('.parametrizations.weight.original1', '.weight_v'): v for k, v in state(name, 'wn').items()}
  assert any(k.endswith('.weight_g') for k in legacy)
  _, from_legacy = state_dict_to_vocoder_params(legacy, config)
  from_legacy = traverse_util.flatten_dict(from_legacy)
  assert all(np.array_equal(from_legacy[p], folded[p]) for p in folded) and from_legacy.keys() == folded.keys()


def _nest_under_generator(src, dst):
  """Rewrite a torch.save zip so its dict sits under 'generator', as in MMAudio's best_netG.pt."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w') as zout:
    for entry in zin.namelist():
      data = zin.read(entry)
      if entry.endswith('/data.pkl'):
        assert data[:2] == b'\x80\x02' and data[-1:] == b'.'  # PROTO 2 ... STOP
        data = b'\x80\x02}X' + struct.pack('<I', 9) + b'generator' + data[2:-1] + b's.'  # {'generator': ...}
      zout.writestr(entry, data)


def test_pth_and_generator_key(tmp_path):
  config = fixture_config('bigvgan16k_snake_amp2')
  _, ref = load_vocoder(vocoder_file('bigvgan16k_snake_amp2_wn.safetensors'), config)
  nested = tmp_path / 'best_netG.pt'
  _nest_under_generator(vocoder_file('bigvgan16k_snake_amp2_wn.pth'), nested)
  for path in (vocoder_file('bigvgan16k_snake_amp2_wn.pth'), nested):
    got_config, got = load_vocoder(path, config)
    assert got_config == config
    assert jax.tree.all(jax.tree.map(np.array_equal, got, ref))
  with pytest.raises(CheckpointError, match='not found'):
    load_vocoder(nested, config, key='ema')


@pytest.mark.parametrize('name', sorted(FULL))
def test_full_size_manifest(name):
  manifest = json.loads(fixture_path('mmaudio_audio', 'manifests', f'{name}_full.json').read_text())
  preset = FULL[name]
  for form, entries in (('weightnorm', manifest['state_dict_weightnormed']), ('fused', manifest['state_dict_fused'])):
    everything = {e['key']: tuple(e['shape']) for e in entries}
    params = {e['key']: tuple(e['shape']) for e in entries if e['kind'] != 'buffer'}
    assert expected_state_dict_shapes(preset, form, buffers=True) == everything
    assert expected_state_dict_shapes(preset, form) == params
  abstract = jax.eval_shape(lambda: init_vocoder(preset))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == manifest['total_params_fused']
  # Inference of the config from shapes alone; zero-stride arrays cost no memory.
  fake = {e['key']: (ANTIALIAS_FILTER.reshape(1, 1, -1) if e['kind'] == 'buffer'
                     else np.broadcast_to(np.float32(0), tuple(e['shape']))) for e in manifest['state_dict_fused']}
  config, params = state_dict_to_vocoder_params(fake)
  assert config == preset
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, abstract)


def test_init_matches_import():
  config = fixture_config('bigvgan16k_snake_amp2')
  _, imported = state_dict_to_vocoder_params(state('bigvgan16k_snake_amp2', 'fused'), config)
  fresh = init_vocoder(config, seed=1)
  assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, imported)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(fresh))


def _edit(key, value):
  def edit(s):
    if value is None:
      del s[key]
    else:
      s[key] = value(s[key]) if callable(value) else value
  return edit


def _set_nan(x):
  x = x.copy()
  x.flat[3] = np.nan
  return x


@pytest.mark.parametrize('edit, key, match', [
    (_edit('conv_post.bias', None), 'conv_post.bias', 'missing'),
    (_edit('resblocks.4.convs.0.bias', np.zeros(4)), 'resblocks.4.convs.0.bias', 'unexpected'),
    (_edit('conv_pre.bias', np.zeros(15)), 'conv_pre.bias', 'wrong shape'),
    (_edit('resblocks.2.activations.1.upsample.filter', lambda f: f * (1 + 1e-12)),
     'resblocks.2.activations.1.upsample.filter', 'anti-alias filter'),
    (_edit('ups.1.0.parametrizations.weight.original1', _set_nan), 'ups.1.0.parametrizations.weight.original1',
     'non-finite'),
    (_edit('ups.1.0.parametrizations.weight.original1', None), 'ups.1.0.parametrizations.weight.original0',
     'counterpart'),
    (_edit('ups.0.0.parametrizations.weight.original0', np.ones((8, 1, 1))),
     'ups.0.0.parametrizations.weight.original0', 'shape'),
])
def test_bad_checkpoints(edit, key, match):
  bad = state('bigvgan16k_snake_amp2', 'wn')
  edit(bad)
  with pytest.raises(CheckpointError, match=match) as info:
    state_dict_to_vocoder_params(bad, fixture_config('bigvgan16k_snake_amp2'), source='ckpt.pth')
  assert key in str(info.value) and 'ckpt.pth' in str(info.value)


def test_bad_mel():
  config = fixture_config('bigvgan16k_snake_amp2')
  params = init_vocoder(config)
  with pytest.raises(ValueError, match='num_mels=80'):
    vocode(config, params, jnp.zeros((1, 4, 81)))
  with pytest.raises(ValueError, match='num_mels=80'):
    vocode(config, params, jnp.zeros((4, 80)))
