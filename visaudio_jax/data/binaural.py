"""Binaural rendering of mono sources with real interaural cues (host-side numpy, for BiAudio-mini).

Azimuth convention (that of SOFA files and `spec/spatial_metrics.md`): degrees on the horizontal
plane, head-relative, 0 = straight ahead, +90 = LEFT, -90 = right, +-180 = behind (counter-clockwise
seen from above). Interaural cues use the same signs as the spatial metrics: ITD > 0 when the left
ear leads, ILD > 0 dB when the left ear is louder.

Two HRTFs share one interface (`hrirs(azimuth_deg, sample_rate) -> (B, 2, N)`, `latency(rate)`):
- `SphericalHead` (default): Brown & Duda (1998) rigid-sphere model. Each ear gets the Woodworth
  arrival time, so the interaural difference is (a/c)(theta + sin theta) for lateral angle theta
  (rear sources fold onto the front), realised as a Kaiser-windowed-sinc fractional delay, and a
  one-pole/one-zero head-shadow filter whose high-frequency gain falls from +6 dB facing the ear to
  about -11 dB behind it (the frequency-dependent ILD). Its phase adds the sphere's larger
  low-frequency ITD, as Brown & Duda intend.
- `HRIRTable` from a SOFA file (`load_sofa`): measured HRIRs, nearest measured direction. The MIT
  KEMAR set ships in Debian's `libmysofa1` as /usr/share/libmysofa/MIT_KEMAR_normal_pinna.sofa
  (`default.sofa` links to it): 710 directions, 512 taps, 44.1 kHz, resampled here on use.

`render_binaural` handles a moving source (or a turning head) by time-varying convolution: the input
is cut into Hann blocks at 50 % overlap (10 ms hop), each block is convolved with the HRIRs of the
azimuth at its centre and the results are overlap-added. The windows sum to one, so a fixed azimuth
gives exactly the linear convolution, and a changing one crossfades between neighbouring HRIRs
without clicks.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Protocol

import numpy as np
import scipy.signal


class HRTF(Protocol):
  """Head-related impulse responses on the horizontal plane, at any render rate."""

  def hrirs(self, azimuth_deg: np.ndarray, sample_rate: int) -> np.ndarray:
    """(B,) degrees -> (B, 2, N) left/right impulse responses."""

  def latency(self, sample_rate: int) -> int:
    """Samples by which the HRIRs delay a frontal source; the renderer removes them to stay in sync."""


def wrap_degrees(angle: np.ndarray) -> np.ndarray:
  """Any angle -> (-180, 180]."""
  return 180.0 - np.mod(180.0 - np.asarray(angle, np.float64), 360.0)


@dataclasses.dataclass(frozen=True)
class SphericalHead:
  """Brown & Duda's spherical head; defaults are theirs (average adult head, ears at +-90 deg)."""
  radius: float = 0.0875  # metres
  speed_of_sound: float = 343.0  # m/s
  alpha_min: float = 0.1  # head-shadow zero factor fully behind the ear (-20 dB at high frequency)
  theta_min_deg: float = 150.0  # incidence angle of the deepest shadow
  sinc_half_width: int = 16  # fractional-delay kernel half-length, samples

  def incidence_deg(self, azimuth_deg: np.ndarray) -> np.ndarray:
    """(...) -> (..., 2): angle between the source and each ear's axis (left ear at +90 deg), in [0, 180]."""
    az = np.asarray(azimuth_deg, np.float64)[..., None]
    return np.abs(wrap_degrees(az - np.array([90.0, -90.0])))

  def arrival_s(self, azimuth_deg: np.ndarray) -> np.ndarray:
    """(...) -> (..., 2) arrival time at each ear relative to the head centre (Woodworth's ray model)."""
    theta = np.deg2rad(self.incidence_deg(azimuth_deg))
    scale = self.radius / self.speed_of_sound
    return np.where(theta < np.pi / 2, -scale * np.cos(theta), scale * (theta - np.pi / 2))

  def itd_s(self, azimuth_deg: np.ndarray) -> np.ndarray:
    """Model ITD, positive when the left ear leads: (a/c)(theta + sin theta) of the lateral angle."""
    arrival = self.arrival_s(azimuth_deg)
    return arrival[..., 1] - arrival[..., 0]

  def _shadow_alpha(self, azimuth_deg: np.ndarray) -> np.ndarray:
    theta = self.incidence_deg(azimuth_deg)
    return (1 + self.alpha_min / 2) + (1 - self.alpha_min / 2) * np.cos(np.deg2rad(theta / self.theta_min_deg * 180.0))

  def latency(self, sample_rate: int) -> int:
    # The earliest arrival is a/c before the centre; the sinc needs its half-width before that.
    return self.sinc_half_width + math.ceil(self.radius / self.speed_of_sound * sample_rate)

  def hrirs(self, azimuth_deg: np.ndarray, sample_rate: int) -> np.ndarray:
    """(B,) degrees -> float64 (B, 2, N): windowed-sinc delay, then the bilinear head-shadow filter."""
    scale = self.radius / self.speed_of_sound
    w0 = self.speed_of_sound / self.radius  # the shadow filter's corner is at 2 * w0 rad/s
    k = 2 * w0 / math.tan(w0 / sample_rate)  # bilinear transform pre-warped at that corner
    pole = (k - 2 * w0) / (k + 2 * w0)
    tail = math.ceil(math.log(1e-7) / math.log(abs(pole))) if pole else 1
    last = self.latency(sample_rate) + scale * math.pi / 2 * sample_rate + self.sinc_half_width
    n = 1 << math.ceil(math.log2(last + tail))

    centre = self.latency(sample_rate) + self.arrival_s(azimuth_deg) * sample_rate  # (B, 2)
    x = np.arange(n) - centre[..., None]  # (B, 2, N)
    inside = np.abs(x) < self.sinc_half_width
    window = np.i0(8.0 * np.sqrt(np.clip(1 - (x / self.sinc_half_width) ** 2, 0, 1))) / np.i0(8.0)
    delay = np.where(inside, np.sinc(x) * window, 0.0)

    alpha = self._shadow_alpha(azimuth_deg)[..., None]  # (B, 2, 1)
    z1 = np.exp(-2j * np.pi * np.fft.rfftfreq(n))  # z^-1 on the rfft grid
    b0, b1 = (alpha * k + 2 * w0) / (k + 2 * w0), (2 * w0 - alpha * k) / (k + 2 * w0)
    shadow = (b0 + b1 * z1) / (1 - pole * z1)
    return np.fft.irfft(np.fft.rfft(delay, n) * shadow, n)


@dataclasses.dataclass(frozen=True, eq=False)
class HRIRTable:
  """Measured HRIRs: azimuth_deg / elevation_deg (M,), irs (M, 2, N) at `sample_rate`."""
  azimuth_deg: np.ndarray
  elevation_deg: np.ndarray
  irs: np.ndarray
  sample_rate: int
  name: str = ''  # where it came from (the SOFA file name), for dataset metadata

  def nearest(self, azimuth_deg: np.ndarray) -> np.ndarray:
    """(B,) horizontal-plane azimuths -> (B,) indices of the nearest measured direction (great circle)."""
    az, el = np.deg2rad(self.azimuth_deg), np.deg2rad(self.elevation_deg)
    measured = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1)  # (M, 3)
    wanted = np.deg2rad(np.asarray(azimuth_deg, np.float64))
    return np.argmax(np.stack([np.cos(wanted), np.sin(wanted)], -1) @ measured[:, :2].T, axis=-1)

  def resampled(self, sample_rate: int) -> HRIRTable:
    if sample_rate == self.sample_rate:
      return self
    g = math.gcd(sample_rate, self.sample_rate)
    irs = scipy.signal.resample_poly(self.irs, sample_rate // g, self.sample_rate // g, axis=-1)
    return dataclasses.replace(self, irs=irs, sample_rate=sample_rate)

  def hrirs(self, azimuth_deg: np.ndarray, sample_rate: int) -> np.ndarray:
    return self.resampled(sample_rate).irs[self.nearest(azimuth_deg)]

  def latency(self, sample_rate: int) -> int:
    front = self.resampled(sample_rate).irs[self.nearest(np.zeros(1))[0]]  # (2, N)
    return round(float(np.argmax(np.abs(front), axis=-1).mean()))


def _attr_text(value) -> str:
  value = value.item() if isinstance(value, np.ndarray) and value.size == 1 else value
  return value.decode() if isinstance(value, bytes) else str(value)


def load_sofa(path: str | os.PathLike) -> HRIRTable:
  """A SOFA `SimpleFreeFieldHRIR` file (netCDF4/HDF5, read with h5py) -> HRIRTable at the file's rate.

  Reads Data.IR (M, 2, N), SourcePosition (M, 3) (spherical degrees, or cartesian), Data.SamplingRate
  and, when present, the integer Data.Delay samples.
  """
  import h5py  # only the SOFA path needs it

  with h5py.File(path, 'r') as f:
    convention = _attr_text(f.attrs.get('SOFAConventions', b'SimpleFreeFieldHRIR'))
    if convention != 'SimpleFreeFieldHRIR':
      raise ValueError(f'{path}: SOFA convention {convention!r}, expected SimpleFreeFieldHRIR')
    irs = np.asarray(f['Data.IR'], np.float64)
    position = np.asarray(f['SourcePosition'], np.float64)
    position_type = _attr_text(f['SourcePosition'].attrs.get('Type', b'spherical'))
    rate = float(np.asarray(f['Data.SamplingRate']).reshape(-1)[0])
    delay = np.asarray(f['Data.Delay']) if 'Data.Delay' in f else np.zeros((1, irs.shape[1]))
  if irs.ndim != 3 or irs.shape[1] != 2:
    raise ValueError(f'{path}: Data.IR must be (measurements, 2 ears, taps), got {irs.shape}')
  if position.shape[0] == 1:
    position = np.repeat(position, irs.shape[0], 0)
  if position.shape != (irs.shape[0], 3):
    raise ValueError(f'{path}: SourcePosition shape {position.shape} does not match Data.IR {irs.shape}')
  if position_type.lower() == 'cartesian':
    x, y, z = position.T
    position = np.stack([np.rad2deg(np.arctan2(y, x)), np.rad2deg(np.arctan2(z, np.hypot(x, y))), np.zeros_like(x)], -1)
  delay = np.broadcast_to(np.rint(delay).astype(int), (irs.shape[0], 2))
  if delay.any():
    shifted = np.zeros(irs.shape[:2] + (irs.shape[2] + delay.max(),))
    for (m, ear), d in np.ndenumerate(delay):
      shifted[m, ear, d:d + irs.shape[2]] = irs[m, ear]
    irs = shifted
  if rate != round(rate):
    raise ValueError(f'{path}: non-integer sampling rate {rate}')
  return HRIRTable(wrap_degrees(position[:, 0]), position[:, 1], irs, int(rate), os.path.basename(path))


def render_binaural(mono: np.ndarray, azimuth_deg: float | np.ndarray, sample_rate: int, hrtf: HRTF | None = None,
                    hop_s: float = 0.01) -> np.ndarray:
  """mono (L,), azimuth scalar or per-sample (L,) in degrees -> float32 (2, L) [left, right], time-aligned
  with the input (the HRTF's frontal latency removed)."""
  hrtf = SphericalHead() if hrtf is None else hrtf
  mono = np.asarray(mono, np.float64)
  length = mono.shape[0]
  azimuth = np.broadcast_to(np.asarray(azimuth_deg, np.float64), (length,))
  if mono.ndim != 1 or not np.isfinite(mono).all() or not np.isfinite(azimuth).all():
    raise ValueError(f'render_binaural: expected finite mono (L,) and azimuths, got shape {mono.shape}')
  hop = max(1, round(hop_s * sample_rate))
  blocks = -(-length // hop) + 1
  # Block k covers input samples [(k - 1) hop, (k + 1) hop), centred on sample k * hop.
  padded = np.pad(mono, (hop, (blocks + 1) * hop - length - hop))
  frames = np.lib.stride_tricks.sliding_window_view(padded, 2 * hop)[::hop][:blocks]  # (K, 2 hop)
  window = 0.5 - 0.5 * np.cos(np.pi * np.arange(2 * hop) / hop)  # periodic Hann: shifted copies sum to 1
  irs = hrtf.hrirs(azimuth[np.minimum(np.arange(blocks) * hop, length - 1)], sample_rate)  # (K, 2, N)
  segments = -(-(2 * hop + irs.shape[-1] - 1) // hop)
  n_fft = segments * hop
  out = np.fft.irfft(np.fft.rfft(frames * window, n_fft)[:, None] * np.fft.rfft(irs, n_fft), n_fft)  # (K, 2, n_fft)
  out = out.reshape(blocks, 2, segments, hop)
  mixed = np.zeros((2, blocks + segments - 1, hop))
  for s in range(segments):
    mixed[:, s:s + blocks] += out[:, :, s].transpose(1, 0, 2)
  start = hop + hrtf.latency(sample_rate)
  return mixed.reshape(2, -1)[:, start:start + length].astype(np.float32)
