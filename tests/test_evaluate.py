"""visaudio_jax.eval.metrics / .quality / .evaluate: baselines beside every metric, per-ear FD/KL against numpy,
file matching with mismatches reported, shard-directory references, outputs on disk.

Clips are 0.5 s at 16 kHz with sources swinging left-right; the spatial front end uses shorter
balance/BiasSkill windows than the 8-s default so those metrics have several windows per clip.
Every evaluation here has the same shapes (4 clips per batch, 8000 samples), so it compiles once.
"""
import dataclasses
import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from visaudio_jax.audio.wav import write_wav
from visaudio_jax.data import schema, shards
from visaudio_jax.data.binaural import render_binaural
from visaudio_jax.eval import evaluate as ev
from visaudio_jax.eval import metrics as em
from visaudio_jax.eval import quality
from visaudio_jax.eval import spatial as sp

SR, L, K, TRACK = 16000, 8000, 4, 8
CFG = sp.SpatialConfig(balance_window=1000, bias_window=2000)
PHASES = (0.0, 1.6, 3.1, 4.7)
PAIRED_ERRORS = ('ild_mae', 'ild_high_mae', 'itd_mae', 'itd_clip_mse', 'iacc_mae', 'balance_mae', 'smr_error')
SPATIAL = PAIRED_ERRORS + ('balance_corr', 'bias_skill', 'ild_w1', 'ild_high_w1', 'itd_w1', 'spatial_fd',
                           'direction_ild', 'direction_itd')


def azimuth(phase: float, points: int) -> np.ndarray:
  """A source swinging between +-80 deg once per clip, at `points` evenly spread instants."""
  t = (np.arange(points) + 0.5) / points
  return 80.0 * np.sin(2 * np.pi * t + phase)


@functools.cache
def clips(seed: int) -> np.ndarray:
  """(K, 2, L) noise rendered along each clip's track; the seed picks the noise, not the scene."""
  rng = np.random.default_rng(seed)
  return np.stack([render_binaural(0.1 * rng.standard_normal(L), azimuth(p, L), SR) for p in PHASES])


def tracks() -> np.ndarray:
  return np.stack([azimuth(p, TRACK) for p in PHASES]).astype(np.float32)


@functools.cache
def good_vs_reference(batch_size: int = K) -> dict:
  """A perfect generative model (other noise, same scenes) scored against the references."""
  return em.evaluate_arrays(clips(1), clips(0), SR, ids=[f'c{i}' for i in range(K)], source_azimuth_deg=tracks(),
                            config=CFG, batch_size=batch_size)


# --- evaluate_arrays: the baselines ----------------------------------------------------------------------


def test_reference_against_itself_is_perfect():
  out = good_vs_reference()
  assert json.loads(json.dumps(out, allow_nan=False))['ids'] == ['c0', 'c1', 'c2', 'c3']  # NaN is None
  assert all(len(v) == K for v in out['per_clip']['ild_mae'].values()) and out['systems'] == list(em.SYSTEMS)
  m = out['metrics']
  for name in PAIRED_ERRORS + ('fp_stft', 'fp_env', 'fp_mag', 'fp_phase', 'ild_w1', 'ild_high_w1', 'itd_w1',
                               'kl_mel_stats', 'kl_mel_stats_left', 'kl_mel_stats_right'):
    assert m[name]['reference'] == pytest.approx(0.0, abs=1e-5), name
  assert m['balance_corr']['reference'] == pytest.approx(1.0, abs=1e-5)
  assert m['bias_skill']['reference'] == pytest.approx(1.0)
  assert m['direction_ild']['reference'] == m['direction_itd']['reference'] == 1.0
  assert m['spatial_fd']['reference'] < 1e-4 and m['fd_mel_stats']['reference'] < 1e-4  # float64
  assert m['fp_snr']['reference'] > 20.0  # capped, not infinite


def test_swap_flips_cues_and_mono_has_none():
  out = good_vs_reference()
  m, clip = out['metrics'], out['per_clip']
  ref = {k: np.asarray(v) for k, v in sp.jitted_frame_features(CFG, jnp.asarray(clips(0))).items()}  # jitted
  for cue in ('ild', 'ild_high'):  # mono: cue 0, so its error is |reference cue|; swapped: -cue, twice that
    want = [np.abs(ref[cue][b][ref['active'][b]]).mean() for b in range(K)]
    np.testing.assert_allclose(clip[f'{cue}_mae']['mono'], want, rtol=1e-4)
    np.testing.assert_allclose(clip[f'{cue}_mae']['swapped'], 2 * np.asarray(want), rtol=1e-4)
  np.testing.assert_allclose(clip['itd_mae']['swapped'], 2 * np.asarray(clip['itd_mae']['mono']), rtol=2e-3)
  assert min(clip['itd_mae']['mono']) > 0.2  # ms: the sources really are lateral
  want_iacc = [1.0 - ref['iacc'][b][ref['active'][b]].mean() for b in range(K)]  # mono IACC is 1
  np.testing.assert_allclose(clip['iacc_mae']['mono'], want_iacc, atol=1e-5)
  assert m['iacc_mae']['swapped'] == pytest.approx(0.0, abs=1e-5)  # IACC has no side
  assert m['smr_error']['mono'] > 40.0  # a mono duplicate has no side signal at all
  assert m['balance_corr']['swapped'] == pytest.approx(-1.0, abs=1e-5)
  assert m['direction_ild']['swapped'] == m['direction_itd']['swapped'] == 0.0
  assert m['direction_ild']['mono'] == m['direction_itd']['mono'] == 0.0
  assert m['direction_frames']['generated'] > 0.3 * K * CFG.num_frames(L)


def test_mono_and_random_do_not_beat_a_good_system():
  out = good_vs_reference()
  m = out['metrics']
  assert not set(out['mono_beats_generated']) & set(SPATIAL), out['mono_beats_generated']
  for name in SPATIAL:
    g = m[name]['generated']
    better = em.metric_info(name).better
    for baseline in ('swapped', 'mono', 'random'):
      b = m[name][baseline]
      if baseline == 'swapped' and name in ('iacc_mae', 'smr_error'):  # side-blind: swapping changes nothing
        assert b == pytest.approx(0.0, abs=1e-5), name
        continue
      if baseline == 'random' and em.metric_info(name).group == 'distribution':
        assert b == pytest.approx(m[name]['reference'], abs=1e-6), name  # set-level: blind to pairing
        continue
      if baseline == 'swapped' and em.metric_info(name).group == 'distribution':
        continue  # these scenes swing symmetrically, so swapping mirrors the cue distribution onto itself
      assert (g < b) if better == 'lower' else (g > b), (name, baseline, g, b)
  assert m['direction_ild']['generated'] > 0.95 and m['direction_itd']['generated'] > 0.95
  assert m['kl_mel_stats']['generated'] < m['kl_mel_stats']['mono']
  assert m['kl_mel_stats']['swapped'] > 0.1 * m['kl_mel_stats']['generated']  # not the reference itself
  assert m['fd_mel_stats']['generated'] < m['fd_mel_stats']['mono']


def test_without_baselines_only_the_generated_set_is_scored():
  full = good_vs_reference()
  alone = em.evaluate_arrays(clips(1), clips(0), SR, ids=full['ids'], source_azimuth_deg=tracks(), config=CFG,
                             baselines=False)
  assert set(alone['metrics']) == set(full['metrics']) and alone['mono_beats_generated'] == []
  for name, values in alone['metrics'].items():
    assert [values[s] for s in em.BASELINES] == [None] * 4, name
    want = full['metrics'][name]['generated']
    assert values['generated'] == (want if isinstance(want, int) else pytest.approx(want, rel=1e-4, abs=1e-5)), name
  assert alone['per_clip']['ild_mae']['mono'] == [None] * K


def test_evaluate_arrays_rejects_bad_input():
  with pytest.raises(ValueError, match=r'\(K, 2, L\)'):
    em.evaluate_arrays(clips(0)[:, :1], clips(0)[:, :1], SR, config=CFG)
  with pytest.raises(ValueError, match='at least'):
    em.evaluate_arrays(clips(0)[..., :1000], clips(0)[..., :1000], SR, config=CFG)
  with pytest.raises(ValueError, match='unknown embedder'):
    em.evaluate_arrays(clips(1), clips(0), SR, config=CFG, embedders=('vggish',))


# --- quality: per-ear FD and KL against numpy -------------------------------------------------------------


def np_frechet(x, y):
  mx, my = x.mean(0), y.mean(0)
  sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  root = scipy.linalg.sqrtm(sx @ sy).real
  return float(((mx - my) ** 2).sum() + np.trace(sx + sy - 2 * root))


def test_frechet_and_kl_per_ear_match_numpy():
  rng = np.random.default_rng(0)
  n, t, d = 40, 3, 5
  gen = rng.standard_normal((n, 2, t, d)) @ rng.standard_normal((d, d)) + 0.5
  ref = rng.standard_normal((n, 2, t, d)) * [1.0, 2.0, 0.5, 1.0, 1.5]
  for pooling, rows in (('frames', lambda x: x.reshape(-1, d)), ('mean', lambda x: x.mean(1))):
    ours = quality.frechet_per_ear(gen, ref, pooling)
    want = [np_frechet(rows(gen[:, ear]), rows(ref[:, ear])) for ear in (0, 1)]
    assert ours['left'] == pytest.approx(want[0], rel=1e-5) and ours['right'] == pytest.approx(want[1], rel=1e-5)
    assert ours['avg'] == pytest.approx(np.mean(want), rel=1e-5)  # eps I in the covariances
    assert min(want) > 1.0
  logits_g, logits_r = rng.standard_normal((n, 2, 7)) * 2, rng.standard_normal((n, 2, 7))
  kl = quality.kl_per_ear(logits_g, logits_r)
  want = np.zeros(2)
  for i, ear in np.ndindex(n, 2):
    p = np.exp(logits_r[i, ear]) / np.exp(logits_r[i, ear]).sum()
    q = np.exp(logits_g[i, ear]) / np.exp(logits_g[i, ear]).sum()
    want[ear] += (p * np.log(p / q)).sum() / n
  assert kl['left'] == pytest.approx(want[0], rel=1e-9) and kl['right'] == pytest.approx(want[1], rel=1e-9)
  assert kl['avg'] == pytest.approx(want.mean(), rel=1e-9)
  assert quality.kl_per_ear(logits_r, logits_r)['avg'] == pytest.approx(0.0, abs=1e-12)


def test_ear_features_run_each_ear_at_the_embedders_rate():
  seen = []

  def embed(wave):
    seen.append(wave.shape)
    return np.stack([wave.mean(-1), np.sqrt((wave ** 2).mean(-1))], -1)  # (N, 2)

  emb = quality.Embedder('probe', 8000, embed, logits_fn=lambda w: np.stack([w.std(-1), -w.std(-1)], -1))
  wave = np.stack([np.ones((2, 1600)) * [[0.5], [-0.25]], np.zeros((2, 1600))]).astype(np.float32)  # (2, 2, L)
  feats = quality.ear_features(emb, wave, 16000)
  assert seen == [(4, 800)]  # clips x ears flattened, resampled 16 kHz -> 8 kHz
  assert feats['embedding'].shape == (2, 2, 2) and feats['logits'].shape == (2, 2, 2)
  np.testing.assert_allclose(feats['embedding'][0, :, 1], [0.5, 0.25], rtol=2e-2)  # rms per ear, in order
  np.testing.assert_allclose(feats['embedding'][1], 0.0, atol=1e-6)
  with pytest.raises(ValueError, match='pooling'):
    quality.Embedder('bad', 16000, embed, pooling='max')


def test_mel_stats_embedder_sees_spectral_change():
  emb = quality.get_embedder('mel_stats')
  assert emb is quality.get_embedder('mel_stats') and emb.sample_rate == 16000
  white = clips(0)[:, 0]  # (K, L)
  dull = np.cumsum(white, -1) * 0.05  # low-passed
  e, lg = emb.embed(white), emb.logits(white)
  assert e.shape == (K, 128) and lg.shape == (K, 64) and np.isfinite(e).all()
  assert quality.kl_per_clip(emb.logits(dull), lg).min() > 10 * quality.kl_per_clip(emb.logits(clips(1)[:, 0]),
                                                                                    lg).max()


# --- evaluate(): files, mismatches, shards, outputs -------------------------------------------------------


def assert_png(path):
  data = path.read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000, path
  from PIL import Image
  with Image.open(path) as image:
    image.verify()


def test_evaluate_folder_reports_mismatches_and_writes_outputs(tmp_path):
  gen_dir, ref_dir, out = tmp_path / 'gen', tmp_path / 'ref', tmp_path / 'out'
  gen_dir.mkdir()
  ref_dir.mkdir()
  ref, gen = clips(0), clips(1)
  for i in range(K):
    write_wav(ref_dir / f'c{i}.wav', ref[i], SR, subtype='FLOAT')
  write_wav(gen_dir / 'c0.wav', gen[0], SR, subtype='FLOAT')
  write_wav(gen_dir / 'c1.wav', np.concatenate([gen[1], gen[1, :, :800]], -1), SR, subtype='FLOAT')  # longer
  write_wav(gen_dir / 'c2.flac', quality.resample(gen[2], SR, 22050), 22050)  # other rate, FLAC
  write_wav(gen_dir / 'c3.wav', gen[3], SR, subtype='FLOAT')
  for name in ('c4', 'c5', 'c6'):  # references without a usable generated file
    write_wav(ref_dir / f'{name}.wav', ref[0], SR, subtype='FLOAT')
  write_wav(gen_dir / 'c5.wav', gen[0, :1], SR)  # mono
  (gen_dir / 'c6.wav').write_bytes(b'not a wav file')
  write_wav(gen_dir / 'stray.wav', gen[0], SR)  # no reference
  metrics = ev.evaluate(gen_dir, ref_dir, out, config=CFG, plot_clips=1, progress=False)

  assert metrics['ids'] == ['c0', 'c1', 'c2', 'c3'] and metrics['num_clips'] == K
  mm = metrics['mismatches']
  assert mm['missing_generated'] == ['c4'] and mm['unmatched_generated'] == ['stray']
  assert mm['wrong_channels'] == [{'id': 'c5', 'generated': 1, 'reference': 2}]
  assert [u['id'] for u in mm['unreadable']] == ['c6'] and mm['unreadable'][0]['side'] == 'generated'
  assert mm['length_mismatch'] == [{'id': 'c1', 'generated_s': 0.55, 'reference_s': 0.5, 'cropped_to_s': 0.5}]
  assert mm['resampled'] == [{'id': 'c2', 'side': 'generated', 'from': 22050, 'to': SR}]
  assert 'direction_ild' not in metrics['metrics']  # WAV references carry no azimuth
  assert metrics['metrics']['ild_mae']['generated'] < 0.5 * metrics['metrics']['ild_mae']['mono']

  stored = json.loads((out / 'metrics.json').read_text(), parse_constant=lambda c: pytest.fail(f'JSON has {c}'))
  assert stored['mismatches'] == json.loads(json.dumps(mm)) and stored['metrics'] == metrics['metrics']
  report = (out / 'report.md').read_text()
  for text in ('| `ild_mae` | ↓ | dB |', '| missing_generated | 1 | c4 |', 'wrong_channels', 'unreadable',
               'length_mismatch', 'resampled', 'unmatched_generated', '"balance_window": 1000',
               '| metric | | unit | generated | reference | swapped | mono | random | beaten by |'):
    assert text in report, text
  assert [p.split('_')[0] for p in metrics['plots']] == ['plots/spectrogram', 'plots/cues', 'plots/per']
  for rel in metrics['plots']:
    assert f']({rel})' in report
    assert_png(out / rel)
  assert sorted(p.name for p in out.iterdir()) == ['metrics.json', 'plots', 'report.md']  # no temp files left


def test_evaluate_shard_reference_with_azimuth(tmp_path):
  spec = schema.ShardSpec(clip_f=(2, 4), sync_f=(2, 4), text_f=(2, 4), latent=(2, 3, 4), audio=(2, L),
                          metadata_frames=TRACK)
  ref, az = clips(0), tracks()
  rng = np.random.default_rng(0)

  def example(i):
    out = {'id': f'c{i}', 'caption': '', 'duration_s': L / SR, 'sample_rate': SR, 'audio': ref[i],
           'source_azimuth_deg': az[i]}
    for name in ('clip_f', 'sync_f', 'text_f', 'latent_mean', 'latent_std'):
      out[name] = rng.standard_normal(schema.features(spec)[name].shape).astype(np.float32)
    return out

  shard_dir, gen_dir = tmp_path / 'shards', tmp_path / 'gen'
  shards.write_split(shard_dir, 'test', spec, example, K, examples_per_shard=3)
  gen_dir.mkdir()
  for i in range(K):
    write_wav(gen_dir / f'c{i}.wav', clips(1)[i], SR, subtype='FLOAT')
  # Batches of 3 (the second padded from 1 clip): the results must not depend on the batching.
  metrics = ev.evaluate(gen_dir, shard_dir, tmp_path / 'out', config=CFG, batch_size=3, plots=False, progress=False)
  assert metrics['source']['reference_kind'] == 'shards' and metrics['source']['reference_split'] == 'test'
  assert metrics['mismatches'] == {} and metrics['plots'] == []
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['metrics.json', 'report.md']
  want = good_vs_reference()  # the same clips as arrays in one batch of 4 (float WAV is lossless)
  assert metrics['ids'] == want['ids'] and set(metrics['metrics']) == set(want['metrics'])
  assert metrics['metrics']['direction_ild']['generated'] > 0.95
  for name, values in want['metrics'].items():
    for system, v in values.items():
      got = metrics['metrics'][name][system]
      assert got == (v if isinstance(v, int) else pytest.approx(v, rel=1e-4, abs=1e-5)), (name, system)
  # A dataset root with one folder per split (BiAudio-mini's and extract_features' layout) works too.
  shards.write_split(tmp_path / 'root' / 'test', 'test', spec, example, K, examples_per_shard=3)
  nested = ev.evaluate(gen_dir, tmp_path / 'root', tmp_path / 'o1', config=CFG, plots=False, progress=False)
  assert nested['source']['reference'] == str(tmp_path / 'root' / 'test')
  assert nested['metrics']['direction_ild'] == pytest.approx(metrics['metrics']['direction_ild'], rel=1e-5)
  with pytest.raises(FileNotFoundError, match=r"no split 'val' \(splits here: \['test'\]\)"):
    ev.evaluate(gen_dir, shard_dir, tmp_path / 'o2', reference_split='val', config=CFG, progress=False)
  no_audio = tmp_path / 'no_audio'
  bare = dataclasses.replace(spec, audio=None, metadata_frames=None)
  shards.write_split(no_audio, 'test', bare, lambda i: {k: v for k, v in example(i).items()
                                                         if k in schema.features(bare).keys()}, 1, 1)
  with pytest.raises(ValueError, match='hold no audio'):
    ev.evaluate(gen_dir, no_audio, tmp_path / 'o3', config=CFG, progress=False)


def test_zero_matches_is_a_clear_error(tmp_path):
  gen_dir, ref_dir = tmp_path / 'gen', tmp_path / 'ref'
  gen_dir.mkdir()
  ref_dir.mkdir()
  write_wav(ref_dir / 'a.wav', clips(0)[0], SR)
  write_wav(gen_dir / 'b.wav', clips(1)[0], SR)
  with pytest.raises(ValueError, match=r"no generated file matches a reference clip \(1 generated files .*"
                                       r"stem = clip id; generated e\.g\. \['b'\], reference e\.g\. \['a'\]"):
    ev.evaluate(gen_dir, ref_dir, tmp_path / 'out', config=CFG, progress=False)
  write_wav(gen_dir / 'a.wav', clips(1)[0, :1], SR)  # matched by name, but mono
  with pytest.raises(ValueError, match=r"'wrong_channels': 1"):
    ev.evaluate(gen_dir, ref_dir, tmp_path / 'out', config=CFG, progress=False)
  with pytest.raises(FileNotFoundError, match='no such folder'):
    ev.evaluate(tmp_path / 'nope', ref_dir, tmp_path / 'out', config=CFG, progress=False)
  assert not (tmp_path / 'out').exists()
