"""visaudio_jax.eval.spatial: numpy references on random signals, spherical-head anchors, §4.9 baselines."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.signal
import scipy.stats

from visaudio_jax.data.binaural import render_binaural
from visaudio_jax.eval import spatial as sp

CFG = sp.SPATIAL_16K
SR = CFG.sample_rate
B, SECONDS = 4, 3
L = SR * SECONDS


@functools.cache
def _compiled(fn):
  return jax.jit(functools.partial(fn, CFG))


def jitted(fn, *args):
  """fn(CFG, *args) under one cached jit per function, so repeated shapes compile once."""
  return _compiled(fn)(*args)


# --- signals -----------------------------------------------------------------------------------------------


def azimuth_track(phase: float, samples: int = L) -> np.ndarray:
  """A source swinging between +-80 deg once every 1.5 s (a turning head), per sample."""
  t = np.arange(samples) / SR
  return 80.0 * np.sin(2 * np.pi * t / 1.5 + phase)


PHASES = (0.0, 1.6, 3.1, 4.7)


@functools.cache
def moving_set(seed: int) -> np.ndarray:
  """(B, 2, L) white noise rendered along azimuth_track(PHASES[b]); the seed picks the noise."""
  rng = np.random.default_rng(seed)
  return np.stack([render_binaural(0.1 * rng.standard_normal(L), azimuth_track(p), SR) for p in PHASES])


def tracks(points: int = 150) -> np.ndarray:
  """azimuth_track sampled at the centres of `points` equal segments: (B, points)."""
  centres = ((np.arange(points) + 0.5) * L / points).astype(int)
  return np.stack([azimuth_track(p)[centres] for p in PHASES])


@functools.cache
def noisy_random(seed: int, length: int = 4096, batch: int = 2) -> np.ndarray:
  """Random binaural-ish signals with a quiet stretch: render at a random azimuth + independent noise."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(batch):
    x = render_binaural(rng.standard_normal(length), rng.uniform(-90, 90), SR)
    x = x + 0.4 * rng.standard_normal(x.shape)
    x[:, length // 4:length // 4 + 2200] *= 1e-3  # a quiet stretch, so the gate has work to do
    out.append(x * rng.uniform(0.05, 0.5))
  return np.stack(out).astype(np.float32)


# --- numpy references --------------------------------------------------------------------------------------


def np_frames(x, n=CFG.frame_length, hop=CFG.hop_length):
  t = 1 + (x.shape[-1] - n) // hop
  return np.stack([x[..., i * hop:i * hop + n] for i in range(t)], -2)


def np_features(wave):
  """Straightforward float64 per-frame cues, frame by frame."""
  wave = np.asarray(wave, np.float64)
  wave = wave - wave.mean(-1, keepdims=True)
  n, m = CFG.frame_length, CFG.max_lag
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
  freqs = np.fft.rfftfreq(n, 1 / SR)
  frames = np_frames(wave)  # (B, 2, T, N)
  out = {k: np.zeros(frames.shape[::2][:2]) for k in ('ild', 'ild_high', 'itd', 'conf', 'iacc')}
  for b, t in np.ndindex(frames.shape[0], frames.shape[2]):
    l, r = frames[b, 0, t], frames[b, 1, t]
    pl, pr = np.abs(np.fft.rfft(l * hann)) ** 2, np.abs(np.fft.rfft(r * hann)) ** 2
    out['ild'][b, t] = 10 * np.log10((pl.sum() + 1e-10) / (pr.sum() + 1e-10))
    hi = freqs > 1500
    out['ild_high'][b, t] = 10 * np.log10((pl[hi].sum() + 1e-10) / (pr[hi].sum() + 1e-10))
    g = np.fft.rfft(l * hann, 2 * n) * np.conj(np.fft.rfft(r * hann, 2 * n))
    cc = np.fft.irfft(g / (np.abs(g) + 1e-20), 2 * n)
    cc = np.concatenate([cc[-m - 1:], cc[:m + 2]])  # lags -m-1 .. m+1
    k = np.argmax(cc[1:-1]) + 1
    y0, y1, y2 = cc[k - 1], cc[k], cc[k + 1]
    delta = 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2) if y0 - 2 * y1 + y2 < 0 else 0.0
    out['itd'][b, t] = -((k - 1 - m) + np.clip(delta, -0.5, 0.5)) / SR * 1e3
    out['conf'][b, t] = y1
    full = np.correlate(l, r, 'full')  # index n - 1 + tau holds sum_t l(t + tau) r(t)
    out['iacc'][b, t] = np.abs(full[n - 1 - m:n + m]).max() / np.sqrt((l ** 2).sum() * (r ** 2).sum())
  level = 10 * np.log10(np.maximum((np_frames(wave.mean(1)) ** 2).mean(-1), 1e-20))
  out['active'] = (level >= -40) & (level >= level.max(-1, keepdims=True) - 30)
  out['valid'] = out['active'] & (out['conf'] >= 0.1)
  return out


def np_balance(wave, size):
  wave = np.asarray(wave, np.float64)
  wave = wave - wave.mean(-1, keepdims=True)
  w = wave.shape[-1] // size
  e = (wave[..., :w * size].reshape(wave.shape[:2] + (w, size)) ** 2).mean(-1)
  return (e[:, 1] - e[:, 0]) / (e[:, 1] + e[:, 0] + 1e-12), np.sqrt((e[:, 0] + e[:, 1]) / 2)


def np_smr(wave):
  wave = np.asarray(wave, np.float64)
  wave = wave - wave.mean(-1, keepdims=True)
  s = ((wave[:, 0] - wave[:, 1]) / 2) ** 2
  m = ((wave[:, 0] + wave[:, 1]) / 2) ** 2
  return np.maximum(10 * np.log10(s.sum(-1) / m.sum(-1)), -60)


# --- numpy parity -----------------------------------------------------------------------------------------


def test_frame_features_match_numpy():
  wave = noisy_random(0)
  ours = {k: np.asarray(v) for k, v in jitted(sp.frame_features, jnp.asarray(wave)).items()}
  ref = np_features(wave)
  np.testing.assert_array_equal(ours['active'], ref['active'])
  assert 0 < ref['active'].sum() < ref['active'].size  # the quiet stretch is gated out
  np.testing.assert_array_equal(ours['itd_valid'], ref['valid'])
  np.testing.assert_allclose(ours['ild'], ref['ild'], atol=2e-3)  # dB
  np.testing.assert_allclose(ours['ild_high'], ref['ild_high'], atol=2e-3)
  np.testing.assert_allclose(ours['itd'], ref['itd'], atol=2e-3)  # ms (1/30 of a sample)
  np.testing.assert_allclose(ours['itd_confidence'], ref['conf'], atol=1e-4)
  np.testing.assert_allclose(ours['iacc'], ref['iacc'], atol=1e-4)


def test_paired_metrics_match_numpy():
  gen, ref = noisy_random(1, length=8000, batch=3), noisy_random(2, length=8000, batch=3)
  cfg = sp.SpatialConfig(balance_window=1000)
  ours = {k: np.asarray(v) for k, v in jax.jit(sp.paired_metrics, static_argnums=0)(cfg, gen, ref).items()}
  fg, fr = np_features(gen), np_features(ref)
  gate, both = fr['active'], fg['valid'] & fr['valid']
  mean = lambda x, m: (x * m).sum(-1) / m.sum(-1)
  for name in ('ild', 'ild_high', 'iacc'):
    np.testing.assert_allclose(ours[name + '_mae'], mean(np.abs(fg[name] - fr[name]), gate), atol=2e-3, err_msg=name)
  np.testing.assert_allclose(ours['itd_mae'], mean(np.abs(fg['itd'] - fr['itd']), both), atol=2e-3)
  np.testing.assert_allclose(ours['itd_coverage'], (both & gate).sum(-1) / gate.sum(-1), atol=1e-6)
  np.testing.assert_allclose(ours['itd_clip_mse'], 1e3 * (mean(fg['itd'], both) - mean(fr['itd'], both)) ** 2,
                             rtol=1e-2, atol=1e-3)
  dg, _ = np_balance(gen, 1000)
  dr, rms = np_balance(ref, 1000)
  level = 20 * np.log10(rms)
  wgate = (level >= -40) & (level >= level.max(-1, keepdims=True) - 30)
  corr = [np.corrcoef(dg[b][wgate[b]], dr[b][wgate[b]])[0, 1] for b in range(3)]
  np.testing.assert_allclose(ours['balance_corr'], corr, atol=1e-4)
  np.testing.assert_allclose(ours['balance_mae'], mean(np.abs(dg - dr), wgate), atol=1e-5)
  np.testing.assert_allclose(ours['smr_error'], np.abs(np_smr(gen) - np_smr(ref)), atol=1e-3)


def test_bias_skill_matches_enumerated_derangements():
  gen, ref = moving_set(1), moving_set(0)
  # Make clip 2's generation weak on the right (reference right-dominant windows become misses).
  gen = gen.copy()
  gen[2, 1] *= 0.5
  ours = {k: float(v) for k, v in jitted(sp.bias_skill, gen, ref).items()}
  dg, rg = np_balance(gen, SR)
  dr, rr = np_balance(ref, SR)
  elig = (np.abs(dr) >= 0.3) & (rr >= 1e-4)
  ok = (rg >= 1e-3) & (np.abs(dg) >= 0.1)

  def a_bal(pairing):  # pairing[j] = generated clip scored against reference j
    sides = []
    for side in (dr < 0, dr > 0):
      recalls = [np.mean((ok[i] & (dg[i] * dr[j] > 0))[elig[j] & side[j]])
                 for j, i in enumerate(pairing) if (elig[j] & side[j]).any()]
      sides.append(np.mean(recalls))
    return np.mean(sides)

  derangements = [p for p in itertools.permutations(range(B)) if all(i != j for j, i in enumerate(p))]
  null = np.mean([a_bal(p) for p in derangements])  # the exact expectation over derangements
  actual = a_bal(range(B))
  np.testing.assert_allclose(ours['a_bal'], actual, atol=1e-6)
  np.testing.assert_allclose(ours['null'], null, atol=1e-6)
  np.testing.assert_allclose(ours['bias_skill'], (actual - null) / (1 - null), atol=1e-5)
  assert ours['a_bal'] < 1.0 and ours['bias_skill'] > 0.0


def test_fairplay_metrics_match_numpy():
  import librosa
  rng = np.random.default_rng(3)
  gen = (0.3 * rng.standard_normal((2, 2, 3200))).astype(np.float32)
  ref = (0.5 * rng.standard_normal((2, 2, 3200))).astype(np.float32)
  gen[0] = 0.7 * ref[0] + 0.1 * gen[0]  # one clip close to its reference
  ours = {k: np.asarray(v) for k, v in jitted(sp.fairplay_metrics, gen, ref).items()}
  g = gen / np.abs(gen).max(axis=(1, 2), keepdims=True)
  r = ref / np.abs(ref).max(axis=(1, 2), keepdims=True)
  stft = lambda x: librosa.stft(x.astype(np.float64), n_fft=512, hop_length=160, win_length=400, center=True,
                                pad_mode='constant')
  expect = {k: [] for k in ours}
  for b in range(2):
    sg, sr_ = stft(g[b]), stft(r[b])  # (2, F, T)
    stacked = np.stack([np.real(sg - sr_), np.imag(sg - sr_)], 1)  # (2, 2, F, T) as Mono2Binaural stacks
    expect['stft'].append(sum(np.mean(stacked[c] ** 2) for c in range(2)))
    expect['mag'].append(sum(np.mean(np.abs(sg[c] - sr_[c]) ** 2) for c in range(2)))
    env = lambda x: np.abs(scipy.signal.hilbert(x))
    expect['env'].append(sum(np.sqrt(np.mean((env(r[b, c]) - env(g[b, c])) ** 2)) for c in range(2)))
    dphi = np.abs(np.angle(stft(g[b, 0] - g[b, 1])) - np.angle(stft(r[b, 0] - r[b, 1])))
    expect['phase'].append(np.mean(np.minimum(dphi, 2 * np.pi - dphi)))
    expect['snr'].append(10 * np.log10((np.mean(r[b] ** 2) + 1e-4) / (np.mean((g[b] - r[b]) ** 2) + 1e-4)))
  for k, v in ours.items():
    np.testing.assert_allclose(v, expect[k], rtol=2e-4, atol=1e-4, err_msg=k)
  np.testing.assert_allclose(ours['mag'], 2 * ours['stft'], rtol=1e-6)


def test_wasserstein_and_frechet_match_scipy():
  rng = np.random.default_rng(4)
  x, y = rng.normal(0, 1, 50), rng.normal(0.5, 2, 80)
  mx, my = rng.random(50) > 0.3, rng.random(80) > 0.5
  w1 = jax.jit(sp.wasserstein_1d)(x.astype(np.float32), y.astype(np.float32), mx, my)
  np.testing.assert_allclose(w1, scipy.stats.wasserstein_distance(x[mx], y[my]), rtol=1e-5)
  fx, fy = rng.normal(size=(40, 6)), rng.normal(0.3, 1.5, size=(30, 6)) @ rng.normal(size=(6, 6))
  sx, sy = np.cov(fx, rowvar=False), np.cov(fy, rowvar=False)
  expect = np.sum((fx.mean(0) - fy.mean(0)) ** 2) + np.trace(sx + sy - 2 * np.real(scipy.linalg.sqrtm(sx @ sy)))
  ours = jax.jit(sp.frechet_distance)(fx.astype(np.float32), fy.astype(np.float32))
  np.testing.assert_allclose(ours, expect, rtol=1e-3)


# --- spherical-head anchors -------------------------------------------------------------------------------


@functools.cache
def fixed_azimuths():
  rng = np.random.default_rng(5)
  noise = 0.1 * rng.standard_normal(L)
  azimuths = (90.0, -90.0, 0.0, 45.0)
  return azimuths, np.stack([render_binaural(noise, a, SR) for a in azimuths])


def test_anchor_azimuths_give_expected_cues():
  _, wave = fixed_azimuths()
  f = {k: np.asarray(v) for k, v in jitted(sp.frame_features, jnp.asarray(wave)).items()}
  assert f['itd_valid'].all()
  itd, ild = np.median(f['itd'], -1), np.median(f['ild'], -1)
  np.testing.assert_allclose(itd, [0.66, -0.66, 0.0, 0.40], atol=0.05)  # ms; Woodworth gives 0.656 / 0.38
  assert ild[0] > 8 and ild[1] < -8 and abs(ild[2]) < 1e-3 and ild[3] > 5  # dB
  assert np.all(np.median(f['ild_high'], -1)[[0, 3]] > ild[[0, 3]])  # head shadow is stronger up high
  assert np.all(np.median(f['iacc'], -1)[[0, 1, 3]] < 0.9) and np.median(f['iacc'][2]) > 0.999


def test_channel_swap_flips_cues_and_mono_has_none():
  _, wave = fixed_azimuths()
  base = sp.sanity_baselines(jnp.asarray(wave))
  f, s, m = (jitted(sp.frame_features, base[k]) for k in ('reference', 'swapped', 'mono'))
  np.testing.assert_allclose(s['ild'], -f['ild'], atol=1e-3)
  np.testing.assert_allclose(s['ild_high'], -f['ild_high'], atol=1e-3)
  np.testing.assert_allclose(s['itd'], -f['itd'], atol=1e-3)
  np.testing.assert_allclose(s['iacc'], f['iacc'], atol=1e-5)
  np.testing.assert_allclose(m['ild'], 0.0, atol=1e-5)
  np.testing.assert_allclose(m['itd'], 0.0, atol=1e-5)
  np.testing.assert_allclose(m['iacc'], 1.0, atol=1e-5)
  np.testing.assert_allclose(jitted(sp.side_mid_ratio, base['mono']), -60.0)


def test_sanity_baselines_structure():
  wave = jnp.asarray(moving_set(0))
  a, b2 = sp.sanity_baselines(wave, seed=3), sp.sanity_baselines(wave, seed=3)
  np.testing.assert_array_equal(a['random'], b2['random'])  # seeded
  np.testing.assert_array_equal(a['swapped'][:, 0], wave[:, 1])
  np.testing.assert_allclose(a['mono'][:, 0], (wave[:, 0] + wave[:, 1]) / 2, atol=1e-7)
  for seed in range(5):
    rand = np.asarray(sp.sanity_baselines(wave, seed=seed)['random'])
    matches = [[np.array_equal(rand[i], wave[j]) for j in range(B)] for i in range(B)]
    assert all(sum(row) == 1 and not row[i] for i, row in enumerate(matches))  # a derangement of the clips


# --- §4.9 baselines against a correctly spatialised render ------------------------------------------------


def test_reference_against_itself_is_perfect():
  ref = jnp.asarray(moving_set(0))
  paired = jitted(sp.paired_metrics, ref, ref)
  for k in ('ild_mae', 'ild_high_mae', 'itd_mae', 'itd_clip_mse', 'iacc_mae', 'balance_mae', 'smr_error'):
    np.testing.assert_allclose(paired[k], 0.0, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(paired['itd_coverage'], 1.0)
  np.testing.assert_allclose(paired['balance_corr'], 1.0, atol=1e-5)
  fp = jitted(sp.fairplay_metrics, ref, ref)
  for k in ('stft', 'env', 'mag', 'phase'):
    np.testing.assert_allclose(fp[k], 0.0, atol=1e-6, err_msg=k)
  cap = 10 * np.log10((np.mean(np.asarray(ref / jnp.max(jnp.abs(ref), (1, 2), keepdims=True)) ** 2, (1, 2)) + 1e-4)
                      / 1e-4)
  np.testing.assert_allclose(fp['snr'], cap, rtol=1e-5)
  assert float(jitted(sp.bias_skill, ref, ref)['bias_skill']) == pytest.approx(1.0)
  for k, v in jitted(sp.cue_wasserstein, ref, ref).items():
    assert float(v) == pytest.approx(0.0, abs=1e-6), k
  feats = np.asarray(jitted(sp.clip_feature_vector, ref))
  scale = np.trace(np.cov(feats, rowvar=False))
  assert float(jitted(sp.spatial_frechet, ref, ref)) < 1e-5 * scale  # float32 rounding only


def test_baselines_lose_to_a_correct_render():
  """A render of *different* noise along the true tracks (a perfect generative model) beats the
  swapped, mono and random baselines on every cue metric, and direction accuracy separates them."""
  ref = jnp.asarray(moving_set(0))
  sets = dict(sp.sanity_baselines(ref, seed=1), good=jnp.asarray(moving_set(1)))
  paired = {k: sp.batch_means(jitted(sp.paired_metrics, v, ref)) for k, v in sets.items()}
  skill = {k: float(jitted(sp.bias_skill, v, ref)['bias_skill']) for k, v in sets.items()}
  direction = {k: jitted(sp.direction_accuracy, v, jnp.asarray(tracks())) for k, v in sets.items()}
  good = paired['good']
  assert float(good['ild_mae']) < 1.0 and float(good['itd_mae']) < 0.05 and float(good['balance_corr']) > 0.95
  for name in ('swapped', 'mono', 'random'):
    bad = paired[name]
    for k in ('ild_mae', 'ild_high_mae', 'itd_mae', 'balance_mae'):
      assert float(bad[k]) > 2 * float(good[k]), (name, k)
    assert not float(bad['balance_corr']) > 0.5, name  # NaN-safe: mono's constant curve fails too
    assert skill[name] < 0.2 and skill['good'] > 0.9, (name, skill)
  assert float(paired['mono']['smr_error']) > 10 * float(good['smr_error'])
  np.testing.assert_allclose(float(paired['mono']['iacc_mae']), 1 - float(
      jnp.mean(jitted(sp.frame_features, ref)['iacc'])), atol=0.02)
  assert int(direction['good']['count']) > 0.4 * B * CFG.num_frames(L)
  for cue in ('ild', 'itd'):
    assert float(direction['good'][cue]) == 1.0
    assert float(direction['reference'][cue]) == 1.0
    assert float(direction['swapped'][cue]) == 0.0
    assert float(direction['mono'][cue]) == 0.0
    np.testing.assert_allclose(direction['good'][cue + '_clip'], 1.0)
  # distributional: the correct render is closer to the references than any baseline but swapped
  # (swapping mirrors a symmetric distribution, so W1 cannot see it — why paired metrics exist).
  w1 = {k: jitted(sp.cue_wasserstein, v, ref) for k, v in sets.items()}
  assert float(w1['mono']['ild_w1']) > 5 * float(w1['good']['ild_w1'])
  assert float(w1['mono']['itd_w1']) > 5 * float(w1['good']['itd_w1'])
