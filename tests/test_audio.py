"""Mel front end, MMAudio VAE and checkpoint import, Griffin-Lim, waveform checks, binaural codec.

Golden data: tests/fixtures/mmaudio_audio (copied from shared/fixtures/mmaudio_audio; its README
describes every tensor): `mel/mel{16k,44k}.safetensors`, `vae/vae{16k,44k}_{raw,fused,io_f32,io_f64}`,
`vae/vae16k_raw.pth`, and the full-size manifests `manifests/vae{16k,44k}_full.json`, all written by
the official MMAudio PyTorch modules (commit 974010a). Layouts there are torch's (B, C, T); ours are
channels-last, hence the transposes.
Tolerances: float64 runs within 1e-10 of the float64 goldens (max abs error / max abs reference);
float32 runs within 1e-4 absolute of the float32 goldens (the README's float32/float64 gap is ~1e-5).
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from conftest import fixture_path
from visaudio_jax.audio import codec as codec_lib
from visaudio_jax.audio import mel as mel_lib
from visaudio_jax.audio.vae import VAE, VAE_16K, VAE_44K, VAEConfig, init_vae
from visaudio_jax.convert import audio as convert_audio
from visaudio_jax.convert.torch_io import CheckpointError

MODES = {'16k': mel_lib.MEL_16K, '44k': mel_lib.MEL_44K}
VAE_IO_KEYS = ('posterior_mean', 'posterior_std', 'z', 'decoded_normalized', 'decoded_mel', 'decoded_mel_from_mode')


def load(*parts: str) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(fixture_path('mmaudio_audio', *parts)))


def channels_last(x: np.ndarray) -> np.ndarray:
  return np.swapaxes(x, -1, -2)


def max_rel(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(got - ref).max() / np.abs(ref).max())


def max_abs(got, ref) -> float:
  return float(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64)).max())


# ---------------------------------------------------------------------------------------------
# Mel front end


@pytest.mark.parametrize('mode', MODES)
def test_reference_constants_are_bitwise_torch_and_librosa(mode):
  cfg, ref = MODES[mode], load('mel', f'mel{mode}.safetensors')
  assert mel_lib.hann_window(cfg.n_fft).tobytes() == ref['hann_window'].tobytes()
  assert mel_lib.mel_basis(cfg).tobytes() == ref['mel_basis'].tobytes()  # shipped
  assert mel_lib.mel_basis(cfg, shipped=False).tobytes() == ref['mel_basis'].tobytes()  # librosa's
  # Sizes not shipped are computed in float64 and rounded; torch's float32 evaluation of
  # 0.5 - 0.5 cos differs from that by up to 2e-7 (why the two sizes MMAudio uses are shipped).
  computed = mel_lib.hann_window(cfg.n_fft, shipped=False)
  assert 0 < np.abs(computed - ref['hann_window']).max() <= 2.5e-7


@pytest.mark.parametrize('mode', MODES)
def test_mel_matches_mmaudio(mode):
  cfg, ref = MODES[mode], load('mel', f'mel{mode}.safetensors')
  with jax.enable_x64(True):
    got64 = jax.jit(functools.partial(mel_lib.mel_spectrogram, cfg))(jnp.asarray(ref['waveform']))
    assert got64.dtype == jnp.float64
    assert max_rel(got64, channels_last(ref['mel_f64'])) < 1e-10
  got32 = jax.jit(functools.partial(mel_lib.mel_spectrogram, cfg))(jnp.asarray(ref['waveform'], jnp.float32))
  assert got32.dtype == jnp.float32 and got32.shape == (2, ref['waveform'].shape[1] // cfg.hop_length, cfg.n_mels)
  assert max_abs(got32, channels_last(ref['mel_f32'])) < 1e-4


def test_istft_inverts_stft_and_griffin_lim_round_trip():
  """A 1 s chirp -> mel -> Griffin-Lim -> mel again: spectral convergence (Frobenius norm of the
  linear-mel difference over the original's) is ~0.06 with 64 iterations; no phase (0 iterations)
  gives ~0.55."""
  cfg, sr = codec_lib.TINY_MEL, 16000
  t = np.arange(sr) / sr
  chirp = jnp.asarray(0.5 * np.sin(2 * np.pi * (200 * t + 1900 * t ** 2)), jnp.float32)
  again = mel_lib.istft(cfg, mel_lib.stft(cfg, chirp))
  assert max_abs(again, chirp[:again.shape[-1]]) < 1e-5

  @jax.jit
  def convergence(wave, iterations):
    log_mel = mel_lib.mel_spectrogram(cfg, wave)
    rebuilt = mel_lib.mel_spectrogram(cfg, mel_lib.mel_to_wave(cfg, log_mel, iterations))
    ref, got = 10.0 ** log_mel, 10.0 ** rebuilt
    return jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)

  assert float(convergence(chirp, 64)) < 0.1
  assert float(convergence(chirp, 0)) > 0.3  # the bound is meaningful


# ---------------------------------------------------------------------------------------------
# VAE


@functools.lru_cache(maxsize=None)
def _vae_fns(cfg: VAEConfig):
  model = VAE(cfg)
  encode = jax.jit(lambda p, x: model.apply({'params': p}, x, method=VAE.encode))
  decode = jax.jit(lambda p, z, unnormalize=True: model.apply({'params': p}, z, unnormalize, method=VAE.decode),
                   static_argnums=2)
  return encode, decode


def _run_vae(params, cfg, mel_in, io):
  encode, decode = _vae_fns(cfg)
  post = encode(params, jnp.asarray(channels_last(mel_in)))
  z = post.sample(jnp.asarray(channels_last(io['eps'])))
  return {'posterior_mean': post.mean, 'posterior_std': post.std, 'z': z,
          'decoded_normalized': decode(params, jnp.asarray(channels_last(io['z'])), False),
          'decoded_mel': decode(params, jnp.asarray(channels_last(io['z']))),
          'decoded_mel_from_mode': decode(params, post.mean)}


@pytest.mark.parametrize('mode', MODES)
def test_vae_float64_matches_mmaudio(mode):
  """The raw checkpoint, fused by our importer, then run in float64 (the fixture's float64 run
  uses torch's float32 fusion, which ours reproduces bitwise)."""
  cfg, params = convert_audio.load_vae(fixture_path('mmaudio_audio', 'vae', f'vae{mode}_raw.safetensors'))
  io, mel = load('vae', f'vae{mode}_io_f64.safetensors'), load('mel', f'mel{mode}.safetensors')
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    got = _run_vae(params64, cfg, mel['mel_f64'], io)
    for key in VAE_IO_KEYS:
      assert got[key].dtype == jnp.float64
      assert max_rel(got[key], channels_last(io[key])) < 1e-10, key


@pytest.mark.parametrize('mode', MODES)
def test_vae_float32_matches_mmaudio(mode):
  cfg, params = convert_audio.load_vae(fixture_path('mmaudio_audio', 'vae', f'vae{mode}_raw.safetensors'))
  io, mel = load('vae', f'vae{mode}_io_f32.safetensors'), load('mel', f'mel{mode}.safetensors')
  got = _run_vae(params, cfg, mel['mel_f32'], io)
  for key in VAE_IO_KEYS:
    assert got[key].dtype == jnp.float32
    assert max_abs(got[key], channels_last(io[key])) < 1e-4, key


@pytest.mark.parametrize('mode', MODES)
def test_vae_import_fuses_weights_bitwise_like_torch(mode):
  _, ours = convert_audio.load_vae(fixture_path('mmaudio_audio', 'vae', f'vae{mode}_raw.safetensors'))
  _, torch_fused = convert_audio.load_vae(fixture_path('mmaudio_audio', 'vae', f'vae{mode}_fused.safetensors'),
                                          fused=True)
  mismatched = jax.tree.leaves(jax.tree.map(lambda a, b: a.tobytes() != b.tobytes(), ours, torch_fused))
  assert len(mismatched) == len(load('vae', f'vae{mode}_fused.safetensors')) and not any(mismatched)


def test_vae_pth_and_safetensors_load_identically():
  cfg_a, a = convert_audio.load_vae(fixture_path('mmaudio_audio', 'vae', 'vae16k_raw.pth'))
  cfg_b, b = convert_audio.load_vae(fixture_path('mmaudio_audio', 'vae', 'vae16k_raw.safetensors'))
  assert cfg_a == cfg_b == VAEConfig(data_dim=80, embed_dim=20, hidden_dim=8)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


@pytest.mark.parametrize('mode,preset', [('16k', VAE_16K), ('44k', VAE_44K)])
def test_vae_full_size_manifest(mode, preset):
  manifest = json.loads(fixture_path('mmaudio_audio', 'manifests', f'vae{mode}_full.json').read_text())
  want = {e['key']: tuple(e['shape']) for e in manifest['state_dict']}
  assert convert_audio.vae_state_dict_shapes(preset) == want
  abstract = jax.eval_shape(lambda: init_vae(preset))
  buffers = sum(e['numel'] for e in manifest['state_dict'] if e['kind'] == 'buffer')
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(abstract)) - buffers == manifest['total_params']
  fake = {k: np.broadcast_to(np.float32(0), s) for k, s in want.items()}  # shapes only, no memory
  assert convert_audio.infer_vae_config(fake) == preset


def _reduced_state():
  return dict(load('vae', 'vae16k_raw.safetensors'))


@pytest.mark.parametrize('edit,message', [
    (lambda s: s.pop('encoder.mid.attn_1.qkv.weight'), 'missing keys (encoder.mid.attn_1.qkv.weight'),
    (lambda s: s.update({'encoder.extra.weight': np.zeros((1,), np.float32)}), 'unexpected keys (encoder.extra.weight'),
    (lambda s: s.update({'decoder.up.1.upsample.conv.weight': np.zeros((16, 16, 5), np.float32)}),
     'decoder.up.1.upsample.conv.weight: (16, 16, 5), expected (16, 16, 3)'),
    (lambda s: s['encoder.conv_in.weight'].__setitem__((0, 0, 0), np.nan),
     'non-finite values in encoder.conv_in.weight'),
    (lambda s: s.update({'data_mean': np.zeros((1, 64, 1), np.float32)}), 'data_dim 64'),
])
def test_vae_import_rejects_bad_state_dicts(edit, message):
  state = {k: v.copy() for k, v in _reduced_state().items()}
  edit(state)
  with pytest.raises(CheckpointError) as err:
    convert_audio.vae_state_dict_to_params(state, source='ckpt.pth')
  assert message in str(err.value) and 'ckpt.pth' in str(err.value)


def test_vae_rejects_wrong_mel_bins():
  params = init_vae(VAEConfig(data_dim=80, embed_dim=4, hidden_dim=4))
  with pytest.raises(ValueError, match=r'expected \(batch, frames, 80\)'):
    VAE(VAEConfig(data_dim=80, embed_dim=4, hidden_dim=4)).apply(
        {'params': params}, jnp.zeros((1, 8, 128)), method=VAE.encode)


# ---------------------------------------------------------------------------------------------
# Waveform checks and the binaural codec


def test_prepare_waveform_errors_name_the_problem():
  cfg = codec_lib.codec_config('tiny_mel')
  stereo = np.zeros((1, 2, 16000), np.float32)
  assert codec_lib.prepare_waveform(stereo, 16000, cfg).shape == (1, 2, 16000)
  assert codec_lib.prepare_waveform(stereo[0], 16000, cfg).shape == (1, 2, 16000)
  with pytest.raises(ValueError, match=r'clip.wav: expected stereo audio shaped \(batch, 2, samples\)'):
    codec_lib.prepare_waveform(np.zeros((16000,), np.float32), 16000, cfg, name='clip.wav')
  with pytest.raises(ValueError, match='expected stereo'):
    codec_lib.prepare_waveform(np.zeros((1, 1, 16000), np.float32), 16000, cfg)
  bad = stereo.copy()
  bad[0, 1, 5] = np.inf
  with pytest.raises(ValueError, match='NaN or Inf'):
    codec_lib.prepare_waveform(bad, 16000, cfg)
  with pytest.raises(ValueError, match='expected float samples'):
    codec_lib.prepare_waveform(stereo.astype(np.int16), 16000, cfg)
  with pytest.raises(ValueError, match='sample rate 48000 Hz, but the codec runs at 16000 Hz; pass resample=True'):
    codec_lib.prepare_waveform(stereo, 48000, cfg)
  with pytest.raises(ValueError, match='100 samples at 16000 Hz is too short; the codec needs at least 385'):
    codec_lib.prepare_waveform(stereo[..., :100], 16000, cfg)


def test_prepare_waveform_resamples_with_soxr():
  cfg = codec_lib.codec_config('tiny_mel')
  t = np.arange(48000) / 48000
  tone = np.stack([np.sin(2 * np.pi * 1000 * t), 0.5 * np.sin(2 * np.pi * 1000 * t)])[None].astype(np.float32)
  out = codec_lib.prepare_waveform(tone, 48000, cfg, resample=True)
  assert out.shape == (1, 2, 16000) and out.dtype == np.float32
  ref = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
  assert max_abs(out[0, 0, 100:-100], ref[100:-100]) < 1e-3  # the tone survives, in phase
  assert max_abs(out[0, 1], 0.5 * out[0, 0]) < 1e-6  # per channel, no mixing


def test_binaural_codec_batches_ears_like_mono_calls():
  cfg = codec_lib.codec_config('tiny_mel')
  rng = np.random.default_rng(0)
  wave = jnp.asarray(rng.uniform(-0.5, 0.5, (2, 2, 4096)), jnp.float32)
  post = jax.jit(lambda w: codec_lib.encode_binaural(cfg, {}, w))(wave)
  assert post.mean.shape == (2, 2, 16, 32) and not post.std.any()
  mono = codec_lib.encode(cfg, {}, wave[:, 1])
  np.testing.assert_array_equal(post.mean[:, 1], mono.mean)
  back = jax.jit(lambda z: codec_lib.decode_binaural(cfg, {}, z))(post.mean)
  assert back.shape == (2, 2, 4096) and np.isfinite(back).all() and np.abs(back).max() <= 1.0


def test_vae_codec_end_to_end_matches_mmaudio_chain_per_ear():
  """The two fixture items as the two ears of one clip: wave -> posterior (vae16k_io_f64) and
  latent z -> VAE decoder -> BigVGAN (bigvgan16k_io.safetensors: chain_wave_f64), in float64,
  both ears in one batched call each way."""
  from visaudio_jax.convert.bigvgan import load_vocoder
  vae_cfg, vae = convert_audio.load_vae(fixture_path('mmaudio_audio', 'vae', 'vae16k_raw.safetensors'))
  voc_cfg, voc = load_vocoder(fixture_path('mmaudio_audio', 'vocoder', 'bigvgan16k_wn.safetensors'))
  cfg = codec_lib.CodecConfig('vae', mel_lib.MEL_16K, vae_cfg, voc_cfg)
  mel, io, chain = load('mel', 'mel16k.safetensors'), load('vae', 'vae16k_io_f64.safetensors'), \
      load('vocoder', 'bigvgan16k_io.safetensors')
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), {'vae': vae, 'vocoder': voc})
    post = jax.jit(lambda p, w: codec_lib.encode_binaural(cfg, p, w))(params, jnp.asarray(mel['waveform'])[None])
    assert post.mean.shape == (1, 2, 31, 20) and post.mean.dtype == jnp.float64
    assert max_rel(post.mean[0], channels_last(io['posterior_mean'])) < 1e-10
    assert max_rel(post.std[0], channels_last(io['posterior_std'])) < 1e-10
    wave = jax.jit(lambda p, z: codec_lib.decode_binaural(cfg, p, z))(params, jnp.asarray(channels_last(io['z']))[None])
    assert wave.shape == (1, 2, 62 * 256)
    assert max_rel(wave[0], chain['chain_wave_f64'][:, 0]) < 1e-10


def test_codec_config_checks_its_parts_fit():
  with pytest.raises(ValueError, match='mel bins disagree'):
    codec_lib.CodecConfig('vae', mel_lib.MEL_44K, VAE_16K, codec_lib.vocoder_lib.BIGVGAN_16K)
  with pytest.raises(ValueError, match="kind must be one of"):
    codec_lib.CodecConfig('wavenet', mel_lib.MEL_16K)
  for name, cfg in codec_lib.CODEC_PRESETS.items():
    assert cfg.samples_per_latent == {'mmaudio_16k': 512, 'mmaudio_44k': 1024, 'tiny_mel': 256}[name]
