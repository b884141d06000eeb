"""Binaural rendering (spherical head, SOFA tables, moving sources) and the BiAudio-mini generator.

Interaural cues are measured from the rendered audio, not read from the model: ITD by GCC-PHAT over
+-1 ms (spectrum zero-padded 16x for sub-sample lags; positive = left ear leads), ILD as the
broadband energy ratio in dB (positive = left louder), the conventions of spec/spatial_metrics.md.
Reference: Woodworth's (a/c)(pi/2 + 1) = 0.656 ms at 90 deg for a = 8.75 cm; MIT KEMAR measures
0.726 ms and +11.8 dB there.
"""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from visaudio_jax.audio.wav import read_wav
from visaudio_jax.data import binaural, synthetic
from visaudio_jax.encoders.video import read_frames

SR = 16000
HEAD = binaural.SphericalHead()


def gcc_phat_itd(left: np.ndarray, right: np.ndarray, sample_rate: int = SR, max_s: float = 1e-3,
                 upsample: int = 16) -> float:
  """Seconds by which the left signal leads the right."""
  n = 2 * len(left)
  cross = np.fft.rfft(left, n) * np.conj(np.fft.rfft(right, n))
  cc = np.fft.irfft(cross / (np.abs(cross) + 1e-20), n * upsample)
  m = int(max_s * sample_rate * upsample)
  lag = np.argmax(np.concatenate([cc[-m:], cc[:m + 1]])) - m  # peak of sum_n l[n + lag] r[n]: minus r's delay
  return -lag / (sample_rate * upsample)


def ild_db(wave: np.ndarray) -> float:
  return 10 * np.log10(np.sum(wave[0].astype(np.float64)**2) / np.sum(wave[1].astype(np.float64)**2))


def windowed_itd(wave: np.ndarray, window: int, min_rms: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """ITD (s) and centre sample of every non-overlapping window whose mean RMS exceeds `min_rms`."""
  itds, centres = [], []
  for start in range(0, wave.shape[1] - window + 1, window):
    seg = wave[:, start:start + window].astype(np.float64)
    if np.sqrt(np.mean(seg**2)) > min_rms:
      itds.append(gcc_phat_itd(seg[0], seg[1]))
      centres.append(start + window // 2)
  return np.array(itds), np.array(centres)


@pytest.fixture(scope='module')
def noise():
  return np.random.default_rng(0).standard_normal(SR)


def test_measured_itd_convention():
  """The estimator's own sign: a right channel delayed by 5 samples reads as +5 samples (left leads)."""
  x = np.random.default_rng(1).standard_normal(4000)
  assert gcc_phat_itd(x[5:], x[:-5]) == pytest.approx(5 / SR, abs=1e-6)


def test_head_model_lateral_and_frontal_cues(noise):
  left, right, front = (binaural.render_binaural(noise, az, SR) for az in (90.0, -90.0, 0.0))
  itd_left, ild_left = gcc_phat_itd(*left), ild_db(left)
  assert 0.6e-3 <= itd_left <= 0.75e-3  # left ear leads
  assert itd_left == pytest.approx(HEAD.itd_s(90.0), abs=3e-5)  # Woodworth 0.656 ms
  assert ild_left > 6.0  # and is louder
  assert gcc_phat_itd(*right) == pytest.approx(-itd_left, abs=1e-6)
  assert ild_db(right) == pytest.approx(-ild_left, abs=1e-3)
  assert abs(gcc_phat_itd(*front)) < 1e-5 and abs(ild_db(front)) < 1e-3
  np.testing.assert_allclose(front[0], front[1], atol=1e-6)


def test_itd_grows_with_azimuth_and_folds_rear_sources(noise):
  azimuths = np.arange(0, 91, 15)
  itds = np.array([gcc_phat_itd(*binaural.render_binaural(noise, az, SR)) for az in azimuths])
  assert np.all(np.diff(itds) > 2e-5)
  np.testing.assert_allclose(itds, HEAD.itd_s(azimuths), atol=3e-5)
  # Behind the head, ITD depends on the lateral angle only: 135 deg sounds like 45 deg.
  assert gcc_phat_itd(*binaural.render_binaural(noise, 135.0, SR)) == pytest.approx(itds[3], abs=1e-5)


def test_fixed_azimuth_is_exact_linear_convolution(noise):
  out = binaural.render_binaural(noise, 37.0, SR)
  irs, latency = HEAD.hrirs(np.array([37.0]), SR)[0], HEAD.latency(SR)
  expected = np.stack([np.convolve(noise, ir)[latency:latency + SR] for ir in irs])
  np.testing.assert_allclose(out, expected, atol=1e-5)


def _write_sofa(path, rate: int) -> None:
  """A SOFA-like SimpleFreeFieldHRIR file holding the head model's HRIRs on a 5 deg horizontal grid
  (SOFA azimuths 0..355, counter-clockwise), plus ear-swapped decoys at 40 deg elevation."""
  azimuth = np.arange(0, 360, 5.0)
  irs = HEAD.hrirs(azimuth, rate)
  positions = np.stack([azimuth, np.zeros_like(azimuth), np.full_like(azimuth, 1.4)], -1)
  decoys = positions + np.array([0.0, 40.0, 0.0])
  with h5py.File(path, 'w') as f:
    f.attrs['Conventions'] = np.bytes_('SOFA')
    f.attrs['SOFAConventions'] = np.bytes_('SimpleFreeFieldHRIR')
    f['Data.IR'] = np.concatenate([irs, irs[:, ::-1]])
    f['Data.SamplingRate'] = np.array([float(rate)])
    f['Data.Delay'] = np.zeros((1, 2))
    f['SourcePosition'] = np.concatenate([positions, decoys])
    f['SourcePosition'].attrs['Type'] = np.bytes_('spherical')
    f['SourcePosition'].attrs['Units'] = np.bytes_('degree, degree, metre')


def test_sofa_table_reproduces_head_model_cues(tmp_path, noise):
  path = tmp_path / 'head.sofa'
  _write_sofa(path, 44100)
  table = binaural.load_sofa(path)
  assert table.irs.shape[0] == 144 and table.sample_rate == 44100 and table.name == 'head.sofa'
  assert table.azimuth_deg[table.nearest(np.array([92.0, -88.0, 181.0]))].tolist() == [90.0, -90.0, 180.0]
  assert np.all(table.elevation_deg[table.nearest(np.arange(-180, 180, 7.0))] == 0)
  for az in (90.0, 45.0, -90.0):
    wave = binaural.render_binaural(noise, az, SR, table)  # resampled 44.1 -> 16 kHz
    reference = binaural.render_binaural(noise, az, SR)
    assert gcc_phat_itd(*wave) == pytest.approx(gcc_phat_itd(*reference), abs=3e-5)
    assert ild_db(wave) == pytest.approx(ild_db(reference), abs=1.0)  # bilinear warping differs at 44.1 kHz
  front = binaural.render_binaural(noise, 0.0, SR, table)
  assert abs(gcc_phat_itd(*front)) < 1e-5
  # The frontal latency is removed: the output lines up with the input.
  assert np.argmax(np.correlate(front[0], noise[:2000], 'valid')[:50]) == 0


def test_moving_source_itd_follows_its_track():
  length = 3 * SR
  azimuth = np.linspace(-80, 80, length)
  wave = binaural.render_binaural(np.random.default_rng(2).standard_normal(length), azimuth, SR)
  itds, centres = windowed_itd(wave, 1600)
  expected = HEAD.itd_s(azimuth[centres])
  assert np.abs(itds - expected).max() < 6e-5
  assert np.corrcoef(itds, expected)[0, 1] > 0.99


def test_moving_source_has_no_clicks():
  """A fast sweep of a 500 Hz tone stays a 500 Hz tone: block switching leaks no broadband energy."""
  t = np.arange(SR) / SR
  wave = binaural.render_binaural(np.sin(2 * np.pi * 500 * t), np.linspace(-90, 90, SR), SR)
  spectrum = np.abs(np.fft.rfft(wave[:, 800:-800] * np.hanning(SR - 1600), axis=-1))**2
  freqs = np.fft.rfftfreq(SR - 1600, 1 / SR)
  assert spectrum[:, freqs > 1500].sum() / spectrum.sum() < 1e-5


SMALL = synthetic.SyntheticConfig(duration_s=(2.0, 2.0), num_objects=(1, 1), classes=('hissing',),
                                  offscreen_prob=0.0, camera_turn_prob=1.0, world_static_prob=0.5)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  out = tmp_path_factory.mktemp('biaudio_mini')
  entries = synthetic.build_split(out, 'test', 3, SMALL, seed=0)
  return out / 'test', entries


@pytest.mark.integration
def test_parallel_build_writes_the_same_clips(built, tmp_path):
  directory, entries = built
  parallel = synthetic.build_split(tmp_path, 'test', 3, SMALL, seed=0, workers=2)
  assert parallel == entries
  for entry in entries:
    for kind in ('wav', 'metadata'):
      assert (tmp_path / 'test' / entry[kind]).read_bytes() == (directory / entry[kind]).read_bytes()


def test_clip_files_exist_and_decode(built):
  directory, entries = built
  manifest = [json.loads(line) for line in (directory / 'manifest.jsonl').read_text().splitlines()]
  assert manifest == entries and len(manifest) == 3
  for entry in manifest:
    meta = json.loads((directory / entry['metadata']).read_text())
    assert meta['caption'] == entry['caption'] and 'hissing green triangle' in meta['caption']
    assert meta['duration_s'] == 2.0 and meta['num_frames'] == 51 and meta['labels'] == ['hissing']
    assert len(meta['camera_yaw_deg']) == 51 and len(meta['sources'][0]['azimuth_deg']) == 51
    frames = read_frames(directory / entry['video'], [25], meta['duration_s'])[0]
    assert frames.shape == (50, 64, 64, 3) and frames.dtype == np.uint8
    wave, rate = read_wav(directory / entry['wav'])
    assert rate == SR and wave.shape == (2, 2 * SR)
    assert 0.8 < np.abs(wave).max() <= 0.9  # peak-normalised, no clipping


def test_clip_audio_and_video_agree_with_recorded_azimuths(built):
  """Per 100 ms window the audio's ITD sign is the recorded azimuth's sign, and the green shape is
  drawn at the recorded column (left of centre for positive azimuths)."""
  directory, entries = built
  signs, columns = [], []
  for entry in entries:
    meta = json.loads((directory / entry['metadata']).read_text())
    source = meta['sources'][0]
    wave, _ = read_wav(directory / entry['wav'])
    itds, centres = windowed_itd(wave, 1600, min_rms=0.05)
    azimuth = np.interp(centres / SR, np.arange(meta['num_frames']) / meta['fps'], source['azimuth_deg'])
    lateral = np.abs(azimuth) > 10
    signs.append(np.sign(itds[lateral]) == np.sign(azimuth[lateral]))
    np.testing.assert_allclose(itds[lateral], HEAD.itd_s(azimuth[lateral]), atol=1e-4)

    frames = read_frames(directory / entry['video'], [25], meta['duration_s'])[0].astype(int)
    green = frames[..., 1] - np.maximum(frames[..., 0], frames[..., 2]) > 80  # (T, H, W) bright triangle pixels
    for k in range(len(frames)):
      inside = 8 < source['column_px'][k] < 56
      if inside and green[k].sum() >= 10:
        columns.append((np.nonzero(green[k])[1].mean() + 0.5, source['column_px'][k]))
  signs = np.concatenate(signs)
  assert len(signs) >= 20 and signs.mean() == 1.0
  drawn, recorded = np.array(columns).T
  assert len(drawn) >= 20 and np.abs(drawn - recorded).max() < 1.5
  assert (recorded < 32).any() and (recorded > 32).any()  # both sides of the frame were checked


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  paths = {}
  for name, seed in (('a', 5), ('b', 5), ('c', 6)):
    entry = synthetic.build_split(tmp_path / name, 'train', 1, synthetic.SyntheticConfig(duration_s=(2.0, 2.0)),
                                  seed)[0]
    paths[name] = {key: tmp_path / name / 'train' / entry[key] for key in ('video', 'wav', 'metadata')}
  for key in ('wav', 'metadata'):
    assert paths['a'][key].read_bytes() == paths['b'][key].read_bytes()
    assert paths['a'][key].read_bytes() != paths['c'][key].read_bytes()
  frames = [read_frames(paths[n]['video'], [25], 2.0)[0] for n in ('a', 'b')]
  np.testing.assert_array_equal(*frames)
