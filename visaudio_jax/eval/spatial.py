"""Pure-DSP spatial metrics for binaural output (`spec/spatial_metrics.md` §4), batched and jit-able.

ViSAudio reports no spatial number besides a listening test, so these are what regression tracking
of the binaural cues rests on. Waveforms are (B, 2, L), channel 0 = left. Signs follow
`visaudio_jax/data/binaural.py`: +90 deg azimuth = left, ITD > 0 when the left ear leads,
ILD > 0 dB when the left ear is louder; the balance d = (E_R - E_L) / (E_R + E_L) is the spec's
(negative = left-dominant).

Every function takes the frozen `SpatialConfig` first (hashable: jit with `static_argnums=0`).
Per-frame features share one frame grid (`frame_length` / `hop_length`, no centring,
T = 1 + (L - frame_length) // hop_length) and one activity gate (§4: frame RMS of the mid
signal >= `gate_abs_db` dBFS and within `gate_rel_db` of the clip's loudest frame). Paired metrics
gate on the reference (ITD: on both signals), as the spec asks, and return per-clip (B,) values
with NaN where a clip has nothing to measure; `batch_means` reduces them with nanmean.
The trap of §0.4 (mono duplicates winning clip-mean ITD) is why `sanity_baselines` exists: report
every metric beside reference/swapped/mono/random.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SpatialConfig:
  """Front end of the spatial metrics; defaults are the spec's §4 values at 16 kHz."""
  sample_rate: int = 16000
  frame_length: int = 1024  # 64 ms: the §4 ILD STFT size, inside the 40-100 ms ITD/IACC range
  hop_length: int = 256  # 16 ms
  ild_eps: float = 1e-10  # §4.1 epsilon in the power ratio
  ild_cutoff_hz: float = 1500.0  # high band (> cutoff) where ILD dominates localisation
  itd_max_ms: float = 1.0  # GCC-PHAT / IACC lag search range, +-
  itd_fmin_hz: float = 0.0  # optional GCC-PHAT band limit (spec suggests 200-1500 Hz); 0/None = full band
  itd_fmax_hz: float | None = None
  itd_min_confidence: float = 0.1  # PHAT peak below this: frame carries no usable ITD
  gate_abs_db: float = -40.0  # dBFS of the frame's mid RMS
  gate_rel_db: float = 30.0  # dB below the clip's loudest frame
  balance_window: int = 4000  # 0.25 s windows for the L/R balance curve (§4.5: 0.1-1 s)
  smr_floor_db: float = -60.0  # side/mid ratio of a mono duplicate is clipped here
  # BiasSkill (§3.3): 1-s windows; GT eligible |d| >= 0.3 and RMS >= 1e-4; generated correct
  # if RMS >= 1e-3, |d| >= 0.1 and the same sign.
  bias_window: int = 16000
  bias_ref_min_abs_d: float = 0.3
  bias_ref_min_rms: float = 1e-4
  bias_gen_min_abs_d: float = 0.1
  bias_gen_min_rms: float = 1e-3
  # FAIR-Play distances (§3.1): librosa STFT n_fft 512, Hann 400 zero-padded, hop 160, centred.
  fp_n_fft: int = 512
  fp_win_length: int = 400
  fp_hop_length: int = 160
  fp_normalize: bool = True  # peak-normalise each clip by its max |x| over both channels
  fp_snr_eps: float = 1e-4  # caps the SNR of a perfect match at 10 log10((mean gt^2 + eps) / eps)
  # Direction accuracy: frames whose true lateral angle exceeds this count; a cue counts as
  # pointing to a side only beyond a dead zone (a mono duplicate's 0 is no side).
  direction_min_lateral_deg: float = 30.0
  direction_min_ild_db: float = 1.0
  direction_min_itd_ms: float = 0.03

  def __post_init__(self):
    if self.frame_length < self.hop_length or self.hop_length < 1:
      raise ValueError(f'SpatialConfig needs frame_length >= hop_length >= 1, got '
                       f'{self.frame_length}, {self.hop_length}')
    if self.max_lag < 1 or self.max_lag + 1 >= self.frame_length:
      raise ValueError(f'SpatialConfig: itd_max_ms={self.itd_max_ms} gives {self.max_lag} lags for '
                       f'frames of {self.frame_length}')

  @property
  def max_lag(self) -> int:
    return round(self.itd_max_ms * 1e-3 * self.sample_rate)

  @property
  def n_freq(self) -> int:
    return self.frame_length // 2 + 1

  def num_frames(self, length: int) -> int:
    if length < self.frame_length:
      raise ValueError(f'spatial: clip of {length} samples is shorter than one frame ({self.frame_length})')
    return 1 + (length - self.frame_length) // self.hop_length


SPATIAL_16K = SpatialConfig()

FEATURE_STATS = ('mean', 'std', 'p10', 'p50', 'p90')
FEATURE_NAMES = ('ild', 'ild_high', 'itd', 'iacc')


def _hann(n: int) -> np.ndarray:
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)  # periodic


def _db(power: Array) -> Array:
  return 10.0 * jnp.log10(jnp.maximum(power, 1e-20))


def _frames(cfg: SpatialConfig, wave: Array) -> Array:
  """(..., L) -> (..., T, frame_length), no padding."""
  t = cfg.num_frames(wave.shape[-1])
  index = np.arange(t)[:, None] * cfg.hop_length + np.arange(cfg.frame_length)[None, :]
  return wave[..., index]


def _windows(wave: Array, size: int) -> Array:
  """(..., L) -> (..., L // size, size) non-overlapping windows, the tail dropped."""
  n = wave.shape[-1] // size
  if n < 1:
    raise ValueError(f'spatial: clip of {wave.shape[-1]} samples is shorter than one window ({size})')
  return wave[..., :n * size].reshape(wave.shape[:-1] + (n, size))


def _remove_dc(wave: Array) -> Array:
  return wave - jnp.mean(wave, axis=-1, keepdims=True)


def _check(wave: Array) -> None:
  if wave.ndim != 3 or wave.shape[1] != 2:
    raise ValueError(f'spatial: expected waveforms (B, 2, L), got {wave.shape}')


def activity_gate(cfg: SpatialConfig, wave: Array) -> Array:
  """(B, 2, L) -> bool (B, T): frame mid RMS >= gate_abs_db dBFS and within gate_rel_db of the loudest."""
  mid = 0.5 * (wave[:, 0] + wave[:, 1])
  level = _db(jnp.mean(_frames(cfg, mid) ** 2, axis=-1))  # (B, T)
  return (level >= cfg.gate_abs_db) & (level >= jnp.max(level, axis=-1, keepdims=True) - cfg.gate_rel_db)


def _lag_correlation(cfg: SpatialConfig, x_l: Array, x_r: Array, phat: bool) -> Array:
  """Frames (..., N) -> cross-correlation at lags -(max_lag+1)..max_lag+1, (..., 2 max_lag + 3).

  r(tau) = sum_t l(t + tau) r(t) by the FFT of size 2N (no wrap-around); with PHAT the spectrum
  is whitened first (optionally band-limited). A lag tau > 0 means the right channel leads.
  """
  n = x_l.shape[-1]
  spec = jnp.fft.rfft(x_l, 2 * n) * jnp.conj(jnp.fft.rfft(x_r, 2 * n))  # (..., n + 1)
  if phat:
    spec = spec / (jnp.abs(spec) + 1e-20)
    freqs = np.fft.rfftfreq(2 * n, 1.0 / cfg.sample_rate)
    band = freqs >= (cfg.itd_fmin_hz or 0.0)
    if cfg.itd_fmax_hz is not None:
      band &= freqs <= cfg.itd_fmax_hz
    if not band.all():
      spec = spec * band
  corr = jnp.fft.irfft(spec, 2 * n)  # (..., 2n), lag k at index k mod 2n
  lags = np.arange(-cfg.max_lag - 1, cfg.max_lag + 2)
  return corr[..., lags % (2 * n)]


def gcc_phat(cfg: SpatialConfig, frames_l: Array, frames_r: Array) -> tuple[Array, Array]:
  """GCC-PHAT ITD (ms, > 0 = left leads) with parabolic peak interpolation, and its confidence.

  Frames (..., N) (already windowed) -> itd (...), confidence (...) = PHAT peak value r(tau*).
  """
  corr = _lag_correlation(cfg, frames_l, frames_r, phat=True)  # (..., 2m + 3)
  m = cfg.max_lag
  inner = corr[..., 1:-1]  # lags -m..m
  k = jnp.argmax(inner, axis=-1)  # (...)
  peak = jnp.take_along_axis(inner, k[..., None], -1)[..., 0]
  before = jnp.take_along_axis(corr, k[..., None], -1)[..., 0]
  after = jnp.take_along_axis(corr, k[..., None] + 2, -1)[..., 0]
  curve = before - 2.0 * peak + after
  offset = jnp.where(curve < 0, 0.5 * (before - after) / jnp.where(curve < 0, curve, -1.0), 0.0)
  tau = (k - m).astype(corr.dtype) + jnp.clip(offset, -0.5, 0.5)
  return -tau / cfg.sample_rate * 1e3, peak


def frame_features(cfg: SpatialConfig, wave: Array) -> dict[str, Array]:
  """Per-frame spatial cues of (B, 2, L) waveforms, each (B, T).

  ild / ild_high: 10 log10 of the L/R power ratio of the Hann-windowed frame, all bins / bins
  above ild_cutoff_hz (dB). itd: GCC-PHAT (ms), itd_confidence: its peak value, itd_valid:
  active and confident. iacc: max over |tau| <= itd_max_ms of the normalised time-domain
  cross-correlation of the raw frame. active: the activity gate.
  """
  _check(wave)
  wave = _remove_dc(wave)
  frames = _frames(cfg, wave)  # (B, 2, T, N)
  windowed = frames * jnp.asarray(_hann(cfg.frame_length), wave.dtype)
  power = jnp.abs(jnp.fft.rfft(windowed, axis=-1)) ** 2  # (B, 2, T, F)
  high = np.fft.rfftfreq(cfg.frame_length, 1.0 / cfg.sample_rate) > cfg.ild_cutoff_hz

  def ild(p):
    return 10.0 * jnp.log10((p[:, 0] + cfg.ild_eps) / (p[:, 1] + cfg.ild_eps))

  itd, confidence = gcc_phat(cfg, windowed[:, 0], windowed[:, 1])
  corr = _lag_correlation(cfg, frames[:, 0], frames[:, 1], phat=False)[..., 1:-1]
  norm = jnp.sqrt(jnp.sum(frames[:, 0] ** 2, -1) * jnp.sum(frames[:, 1] ** 2, -1))
  iacc = jnp.max(jnp.abs(corr), axis=-1) / jnp.maximum(norm, 1e-20)
  active = activity_gate(cfg, wave)
  return {'ild': ild(power.sum(-1)), 'ild_high': ild(jnp.sum(power * high, -1)), 'itd': itd,
          'itd_confidence': confidence, 'itd_valid': active & (confidence >= cfg.itd_min_confidence),
          'iacc': iacc, 'active': active}


# For host callers (reports, the demo check); other functions here call `frame_features` inside their jit.
jitted_frame_features = jax.jit(frame_features, static_argnums=0)


def balance_curve(cfg: SpatialConfig, wave: Array, window: int | None = None) -> tuple[Array, Array]:
  """L/R energy balance d = (E_R - E_L) / (E_R + E_L + 1e-12) per non-overlapping window, and its RMS.

  (B, 2, L) -> d (B, W), rms (B, W) with rms = sqrt((E_L + E_R) / 2), E = mean square (DC removed).
  """
  _check(wave)
  energy = jnp.mean(_windows(_remove_dc(wave), window or cfg.balance_window) ** 2, axis=-1)  # (B, 2, W)
  e_l, e_r = energy[:, 0], energy[:, 1]
  return (e_r - e_l) / (e_r + e_l + 1e-12), jnp.sqrt(0.5 * (e_l + e_r))


def side_mid_ratio(cfg: SpatialConfig, wave: Array) -> Array:
  """Clip side-to-mid energy ratio 10 log10(sum S^2 / sum M^2), S, M = (L -+ R) / 2: (B, 2, L) -> (B,) dB."""
  _check(wave)
  wave = _remove_dc(wave)
  side = jnp.sum((0.5 * (wave[:, 0] - wave[:, 1])) ** 2, -1)
  mid = jnp.sum((0.5 * (wave[:, 0] + wave[:, 1])) ** 2, -1)
  return jnp.maximum(_db(side) - _db(mid), cfg.smr_floor_db)


def _masked_mean(x: Array, mask: Array, axis=-1) -> Array:
  count = jnp.sum(mask, axis=axis)
  total = jnp.sum(jnp.where(mask, x, 0.0), axis=axis)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


def _masked_pearson(x: Array, y: Array, mask: Array) -> Array:
  """Pearson r over masked entries of the last axis; NaN if fewer than 2 or y (reference) is ~constant."""
  count = jnp.sum(mask, -1)
  mx, my = _masked_mean(x, mask)[..., None], _masked_mean(y, mask)[..., None]
  dx, dy = jnp.where(mask, x - mx, 0.0), jnp.where(mask, y - my, 0.0)
  vx, vy = jnp.sum(dx * dx, -1), jnp.sum(dy * dy, -1)
  ok = (count >= 2) & (vy > 1e-8 * jnp.maximum(count, 1))
  r = jnp.sum(dx * dy, -1) / jnp.sqrt(jnp.maximum(vx * vy, 1e-30))
  return jnp.where(ok, jnp.where(vx > 0, r, 0.0), jnp.nan)


def paired_metrics(cfg: SpatialConfig, generated: Array, reference: Array) -> dict[str, Array]:
  """Interaural-cue errors of generated vs reference clips of the same videos, each (B,).

  ild_mae, ild_high_mae (dB) and iacc_mae over reference-active frames; itd_mae (ms) over frames
  active and confident in both, itd_coverage = their share of reference-active frames;
  itd_clip_mse = BEWO's 1000 (mean_t ITD_gen - mean_t ITD_ref)^2 on those frames (never alone);
  balance_corr (Pearson, NaN when the reference balance is constant) and balance_mae over
  reference-active balance windows; smr_error = |SMR_gen - SMR_ref| (dB).
  """
  if generated.shape != reference.shape:
    raise ValueError(f'paired_metrics: shapes differ, {generated.shape} vs {reference.shape}')
  gen, ref = frame_features(cfg, generated), frame_features(cfg, reference)
  gate = ref['active']
  both = gen['itd_valid'] & ref['itd_valid']
  out = {name + '_mae': _masked_mean(jnp.abs(gen[name] - ref[name]), gate) for name in ('ild', 'ild_high', 'iacc')}
  out['itd_mae'] = _masked_mean(jnp.abs(gen['itd'] - ref['itd']), both)
  out['itd_coverage'] = jnp.where(jnp.any(gate, -1), jnp.sum(both & gate, -1) / jnp.maximum(jnp.sum(gate, -1), 1),
                                  jnp.nan)
  out['itd_clip_mse'] = 1e3 * (_masked_mean(gen['itd'], both) - _masked_mean(ref['itd'], both)) ** 2
  d_gen, _ = balance_curve(cfg, generated)
  d_ref, rms_ref = balance_curve(cfg, reference)
  level = _db(rms_ref ** 2)
  window_gate = (level >= cfg.gate_abs_db) & (level >= jnp.max(level, -1, keepdims=True) - cfg.gate_rel_db)
  out['balance_corr'] = _masked_pearson(d_gen, d_ref, window_gate)
  out['balance_mae'] = _masked_mean(jnp.abs(d_gen - d_ref), window_gate)
  out['smr_error'] = jnp.abs(side_mid_ratio(cfg, generated) - side_mid_ratio(cfg, reference))
  return out


def batch_means(metrics: dict[str, Array]) -> dict[str, Array]:
  """Per-clip metrics -> their nanmean over the batch (clips with nothing to measure are skipped)."""
  return {k: jnp.nanmean(v) if v.ndim else v for k, v in metrics.items()}


def bias_skill(cfg: SpatialConfig, generated: Array, reference: Array) -> dict[str, Array]:
  """WorldSonus BiasSkill (§3.3) at cfg.sample_rate over the batch (B >= 2): a scalar dict.

  recall[i, j, s] = share of side-s eligible windows of reference j that generated clip i gets
  right; A_s = mean over clips j (having such windows) of recall[j, j, s]; a_bal = mean of A_L, A_R
  (a side with no eligible clip is skipped). The null is the *exact* expectation under uniformly
  random derangements, mean_{i != j} recall[i, j, s] (what the spec's 10 000 samples estimate).
  bias_skill = (a_bal - null) / (1 - null), a fraction (x100 for the paper's %).
  The permutation p-value is not computed.
  """
  if generated.shape != reference.shape or generated.shape[0] < 2:
    raise ValueError(f'bias_skill: needs equal shapes with B >= 2, got {generated.shape}, {reference.shape}')
  d_gen, rms_gen = balance_curve(cfg, generated, cfg.bias_window)  # (B, W)
  d_ref, rms_ref = balance_curve(cfg, reference, cfg.bias_window)
  eligible = (jnp.abs(d_ref) >= cfg.bias_ref_min_abs_d) & (rms_ref >= cfg.bias_ref_min_rms)
  sides = jnp.stack([eligible & (d_ref < 0), eligible & (d_ref > 0)], -1)  # (B_ref, W, 2): left, right
  gen_ok = (rms_gen >= cfg.bias_gen_min_rms) & (jnp.abs(d_gen) >= cfg.bias_gen_min_abs_d)
  correct = gen_ok[:, None] & (d_gen[:, None] * d_ref[None] > 0)  # (B_gen, B_ref, W)
  hits = jnp.einsum('ijw,jws->ijs', correct.astype(d_ref.dtype), sides.astype(d_ref.dtype))
  count = jnp.sum(sides, axis=1)  # (B_ref, 2)
  recall = hits / jnp.maximum(count, 1)[None]  # (B_gen, B_ref, 2)
  has = count > 0  # (B_ref, 2)
  b = generated.shape[0]
  own = jnp.diagonal(recall, axis1=0, axis2=1).T  # (B_ref, 2)
  null = (jnp.sum(recall, 0) - own) / (b - 1)
  a_side = _masked_mean(own.T, has.T)  # (2,)
  null_side = _masked_mean(null.T, has.T)
  a_bal, mu = jnp.nanmean(a_side), jnp.nanmean(null_side)
  return {'a_left': a_side[0], 'a_right': a_side[1], 'a_bal': a_bal, 'null': mu,
          'bias_skill': (a_bal - mu) / (1.0 - mu)}


# --- FAIR-Play paired distances (§3.1 / §4.7) ----------------------------------------------------------


def fairplay_stft(cfg: SpatialConfig, wave: Array) -> Array:
  """librosa.stft(n_fft=fp_n_fft, win_length=fp_win_length, hop=fp_hop_length, center=True,
  pad_mode='constant') with a periodic Hann window zero-padded to n_fft: (..., L) -> (..., F, T)."""
  n, hop = cfg.fp_n_fft, cfg.fp_hop_length
  left = (n - cfg.fp_win_length) // 2
  window = np.zeros(n, np.float32)
  window[left:left + cfg.fp_win_length] = _hann(cfg.fp_win_length)
  padded = jnp.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(n // 2, n // 2)])
  t = 1 + wave.shape[-1] // hop
  index = np.arange(t)[:, None] * hop + np.arange(n)[None, :]
  spec = jnp.fft.rfft(padded[..., index] * jnp.asarray(window, wave.dtype), axis=-1)  # (..., T, F)
  return jnp.swapaxes(spec, -1, -2)


def hilbert_envelope(wave: Array) -> Array:
  """|scipy.signal.hilbert(x)| along the last axis (FFT of the full length)."""
  n = wave.shape[-1]
  h = np.zeros(n, np.float32)
  h[0] = 1.0
  if n % 2 == 0:
    h[n // 2] = 1.0
    h[1:n // 2] = 2.0
  else:
    h[1:(n + 1) // 2] = 2.0
  return jnp.abs(jnp.fft.ifft(jnp.fft.fft(wave, axis=-1) * h, axis=-1))


def fairplay_metrics(cfg: SpatialConfig, generated: Array, reference: Array) -> dict[str, Array]:
  """Mono2Binaural / Sep-Stereo distances, per clip (B,): stft, env, mag (= 2 stft), phase (D_phase,
  radians in [0, pi]), snr (dB, capped by fp_snr_eps for a perfect match). Each clip is first
  peak-normalised by its own max |x| over both channels when fp_normalize."""
  _check(generated)
  _check(reference)
  if cfg.fp_normalize:
    generated = generated / jnp.maximum(jnp.max(jnp.abs(generated), axis=(1, 2), keepdims=True), 1e-20)
    reference = reference / jnp.maximum(jnp.max(jnp.abs(reference), axis=(1, 2), keepdims=True), 1e-20)
  s_gen, s_ref = fairplay_stft(cfg, generated), fairplay_stft(cfg, reference)  # (B, 2, F, T)
  stft_dist = jnp.sum(0.5 * jnp.mean(jnp.abs(s_gen - s_ref) ** 2, axis=(-2, -1)), -1)
  env = jnp.sum(jnp.sqrt(jnp.mean((hilbert_envelope(reference) - hilbert_envelope(generated)) ** 2, -1)), -1)
  diff_gen = fairplay_stft(cfg, generated[:, 0] - generated[:, 1])
  diff_ref = fairplay_stft(cfg, reference[:, 0] - reference[:, 1])
  dphi = jnp.abs(jnp.angle(diff_gen) - jnp.angle(diff_ref))
  phase = jnp.mean(jnp.minimum(dphi, 2 * np.pi - dphi), axis=(-2, -1))
  eps = cfg.fp_snr_eps
  error = jnp.mean((generated - reference) ** 2, (1, 2))
  snr = 10.0 * jnp.log10((jnp.mean(reference ** 2, (1, 2)) + eps) / (error + eps))
  return {'stft': stft_dist, 'env': env, 'mag': 2.0 * stft_dist, 'phase': phase, 'snr': snr}


# --- distributional ---------------------------------------------------------------------------------------


def wasserstein_1d(x: Array, y: Array, x_mask: Array | None = None, y_mask: Array | None = None) -> Array:
  """W1 = integral |F_x - F_y| between the empirical distributions of the masked entries of x and y
  (any shapes, flattened; unequal counts fine). NaN if either side is empty."""
  x, y = jnp.ravel(x), jnp.ravel(y)
  wx = jnp.ones_like(x) if x_mask is None else jnp.ravel(x_mask).astype(x.dtype)
  wy = jnp.ones_like(y) if y_mask is None else jnp.ravel(y_mask).astype(y.dtype)
  values = jnp.concatenate([jnp.where(wx > 0, x, 0.0), jnp.where(wy > 0, y, 0.0)])
  order = jnp.argsort(values)
  z = values[order]
  cx = jnp.cumsum(jnp.concatenate([wx, jnp.zeros_like(wy)])[order]) / jnp.sum(wx)
  cy = jnp.cumsum(jnp.concatenate([jnp.zeros_like(wx), wy])[order]) / jnp.sum(wy)
  w1 = jnp.sum(jnp.abs(cx[:-1] - cy[:-1]) * jnp.diff(z))
  return jnp.where((jnp.sum(wx) > 0) & (jnp.sum(wy) > 0), w1, jnp.nan)


def cue_wasserstein(cfg: SpatialConfig, generated: Array, reference: Array) -> dict[str, Array]:
  """PLACE-style distribution distances (§4.1/§4.2): W1 between pooled gated frame ILD (dB, broadband
  and high band) and ITD (ms, active and confident frames) of two sets; each set gated by itself."""
  gen, ref = frame_features(cfg, generated), frame_features(cfg, reference)
  out = {f'{k}_w1': wasserstein_1d(gen[k], ref[k], gen['active'], ref['active']) for k in ('ild', 'ild_high')}
  out['itd_w1'] = wasserstein_1d(gen['itd'], ref['itd'], gen['itd_valid'], ref['itd_valid'])
  return out


def clip_feature_vector(cfg: SpatialConfig, wave: Array) -> Array:
  """Per-clip DSP spatial summary for the Fréchet distance (§4.8): for ild, ild_high, itd, iacc
  (FEATURE_NAMES) the FEATURE_STATS over gated frames, then the side/mid ratio: (B, 2, L) -> (B, 21).
  Clips without gated frames give NaN entries."""
  feats = frame_features(cfg, wave)
  columns = []
  for name in FEATURE_NAMES:
    mask = feats['itd_valid'] if name == 'itd' else feats['active']
    x = jnp.where(mask, feats[name], jnp.nan)  # (B, T)
    columns += [jnp.nanmean(x, -1), jnp.nanstd(x, -1)]
    columns += list(jnp.nanpercentile(x, jnp.array([10.0, 50.0, 90.0], x.dtype), axis=-1))
  columns.append(side_mid_ratio(cfg, wave))
  return jnp.stack(columns, -1)


def frechet_distance(x: Array, y: Array, eps: float = 1e-6) -> Array:
  """||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^1/2) of two sets of row vectors (N, D), (M, D).

  Tr (S_x S_y)^1/2 is the sum of square roots of the eigenvalues of S_x^1/2 S_y S_x^1/2 (symmetric),
  which needs only eigh (jit-able, no complex sqrtm); eps I is added to both covariances as the
  §1.3 reference does when sqrtm fails.
  """
  def stats(v):
    mu = jnp.mean(v, 0)
    d = v - mu
    return mu, d.T @ d / (v.shape[0] - 1) + eps * jnp.eye(v.shape[1], dtype=v.dtype)

  (mx, sx), (my, sy) = stats(x), stats(y)
  w, v = jnp.linalg.eigh(sx)
  root = (v * jnp.sqrt(jnp.maximum(w, 0.0))) @ v.T
  inner = jnp.linalg.eigvalsh(root @ sy @ root)
  distance = jnp.sum((mx - my) ** 2) + jnp.trace(sx) + jnp.trace(sy) - 2.0 * jnp.sum(jnp.sqrt(jnp.maximum(inner, 0.0)))
  return jnp.maximum(distance, 0.0)  # >= 0 exactly; float32 rounding of equal sets can dip below


def spatial_frechet(cfg: SpatialConfig, generated: Array, reference: Array) -> Array:
  """FSAD-lite: Fréchet distance between clip_feature_vector of two sets (NaN features -> 0; regression
  tracking only, no literature values)."""
  fx = jnp.nan_to_num(clip_feature_vector(cfg, generated))
  fy = jnp.nan_to_num(clip_feature_vector(cfg, reference))
  return frechet_distance(fx, fy)


# --- sanity baselines and direction accuracy -------------------------------------------------------------


def sanity_baselines(reference: Array, seed: int = 0) -> dict[str, Array]:
  """§4.9 comparison sets for references (B, 2, L), each (B, 2, L), to score against `reference`:
  reference (must be perfect), swapped (L <-> R), mono (downmix (L+R)/2 on both channels) and
  random (another clip's reference: a seeded random cyclic derangement, so no clip keeps its own; B >= 2)."""
  _check(reference)
  b = reference.shape[0]
  if b < 2:
    raise ValueError('sanity_baselines: random pairing needs B >= 2')
  perm = jax.random.permutation(jax.random.key(seed), b)
  inverse = jnp.argsort(perm)
  partner = perm[(inverse + 1) % b]  # clip i -> the next clip in a random cycle, never i
  mono = jnp.mean(reference, axis=1, keepdims=True)
  return {'reference': reference, 'swapped': reference[:, ::-1], 'mono': jnp.concatenate([mono, mono], 1),
          'random': reference[partner]}


def direction_accuracy(cfg: SpatialConfig, generated: Array, azimuth_deg: Array,
                       mask: Array | None = None) -> dict[str, Array]:
  """Share of (clip, frame) with a lateral true source whose generated ILD / ITD points to its side.

  azimuth_deg (B, K): the true azimuth track, K points spread evenly over the clip (point k stands
  for the centre of the k-th of K equal segments); it is interpolated (via sin azimuth, so the
  +-180 wrap is harmless) to the frame centres. Counted frames: |lateral angle| =
  |asin(sin az)| > direction_min_lateral_deg, the generated clip's activity gate, and `mask`
  (B, T) if given (e.g. the reference's gate). A cue is right only beyond its dead zone
  (direction_min_ild_db / _itd_ms) with the true side's sign (+ = left). Returns scalars
  ild, itd and count (frames counted; NaN accuracies if none), plus per-clip ild_clip, itd_clip.
  """
  feats = frame_features(cfg, generated)
  l = generated.shape[-1]
  t = cfg.num_frames(l)
  k = azimuth_deg.shape[-1]
  centres = (np.arange(t) * cfg.hop_length + cfg.frame_length / 2) / l * k - 0.5  # in track-point units
  sin_az = jax.vmap(lambda a: jnp.interp(jnp.asarray(centres, a.dtype), jnp.arange(k, dtype=a.dtype), a))(
      jnp.sin(jnp.deg2rad(azimuth_deg)))  # (B, T)
  lateral = jnp.abs(sin_az) > np.sin(np.deg2rad(cfg.direction_min_lateral_deg))
  counted = lateral & feats['active']
  if mask is not None:
    counted = counted & mask
  side = jnp.sign(sin_az)
  ild_ok = (jnp.abs(feats['ild']) >= cfg.direction_min_ild_db) & (jnp.sign(feats['ild']) == side)
  itd_ok = (jnp.abs(feats['itd']) >= cfg.direction_min_itd_ms) & (jnp.sign(feats['itd']) == side)
  total = jnp.sum(counted)
  acc = lambda ok: jnp.where(total > 0, jnp.sum(ok & counted) / jnp.maximum(total, 1), jnp.nan)
  return {'ild': acc(ild_ok), 'itd': acc(itd_ok), 'count': total,
          'ild_clip': _masked_mean(ild_ok.astype(sin_az.dtype), counted),
          'itd_clip': _masked_mean(itd_ok.astype(sin_az.dtype), counted)}
