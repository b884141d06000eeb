"""MMAudio's log-mel front end (`mmaudio/ext/mel_converter.py`), its inverse STFT, and Griffin-Lim.

Layout is channels-last: waveforms (..., L), spectrograms (..., T, F). The STFT has no centring:
the waveform is reflect-padded by (n_fft - hop)/2 on each side instead, so T = L // hop exactly.
The float32 constants are the reference ones: torch's periodic Hann window and librosa's Slaney
filterbank, shipped bitwise for MMAudio's two front ends (torch's float32 cosine cannot be
reproduced in numpy, and a pinned filterbank does not drift with librosa versions); other sizes are
computed (librosa is imported only then).
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

Array = jax.Array

_CONSTANTS = pathlib.Path(__file__).parent / 'data' / 'mmaudio_audio_constants.safetensors'
_LOG = {'log10': jnp.log10, 'ln': jnp.log}
_EXP = {'log10': lambda x: 10.0 ** x, 'ln': jnp.exp}


@dataclasses.dataclass(frozen=True)
class MelConfig:
  """A log-mel front end; `log` is 'log10' (MMAudio 16k) or 'ln' (MMAudio 44k)."""
  sample_rate: int
  n_fft: int
  hop_length: int
  n_mels: int
  fmin: float = 0.0
  fmax: float | None = None  # None: sample_rate / 2
  log: str = 'log10'
  floor: float = 1e-5  # mel magnitudes are clamped here before the log

  def __post_init__(self):
    if self.log not in _LOG:
      raise ValueError(f'MelConfig.log must be one of {sorted(_LOG)}, got {self.log!r}')
    if self.n_fft < self.hop_length or (self.n_fft - self.hop_length) % 2:
      raise ValueError(f'MelConfig needs n_fft >= hop_length with an even difference, got '
                       f'n_fft={self.n_fft}, hop_length={self.hop_length}')

  @property
  def n_freq(self) -> int:
    return self.n_fft // 2 + 1

  @property
  def padding(self) -> int:
    return (self.n_fft - self.hop_length) // 2


MEL_16K = MelConfig(sample_rate=16000, n_fft=1024, hop_length=256, n_mels=80, fmax=8000.0, log='log10')
MEL_44K = MelConfig(sample_rate=44100, n_fft=2048, hop_length=512, n_mels=128, fmax=22050.0, log='ln')


@functools.lru_cache(maxsize=None)
def reference_constants() -> dict[str, np.ndarray]:
  """The shipped float32 tables (read-only): Hann windows, filterbanks, VAE mel statistics."""
  tables = safetensors.numpy.load_file(_CONSTANTS)
  for table in tables.values():
    table.flags.writeable = False  # shared through the caches below
  return tables


@functools.lru_cache(maxsize=None)
def hann_window(n: int, shipped: bool = True) -> np.ndarray:
  """torch.hann_window(n) (periodic) in float32: shipped bitwise for n = 1024, 2048; otherwise
  computed in float64 and rounded (torch's float32 evaluation differs from that by up to 2e-7)."""
  table = reference_constants().get(f'hann_window_{n}') if shipped else None
  if table is not None:
    return table
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def mel_basis(cfg: MelConfig, shipped: bool = True) -> np.ndarray:
  """librosa's float32 Slaney-scale, Slaney-normalised filterbank, (n_mels, n_freq)."""
  fmax = cfg.sample_rate / 2 if cfg.fmax is None else cfg.fmax
  key = f'mel_basis_{cfg.sample_rate}_{cfg.n_fft}_{cfg.n_mels}_{cfg.fmin:g}_{fmax:g}'
  table = reference_constants().get(key) if shipped else None
  if table is not None:
    return table
  import librosa  # heavy (numba, scipy): only for front ends other than MMAudio's
  return librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin,
                             fmax=cfg.fmax, dtype=np.float32)


def _frame_index(num_frames: int, n_fft: int, hop: int) -> np.ndarray:
  return np.arange(num_frames)[:, None] * hop + np.arange(n_fft)[None, :]  # (T, n_fft)


def _frames(x: Array, num_frames: int, n_fft: int, hop: int) -> Array:
  """(..., L) -> (..., T, n_fft) frames every `hop` samples. When hop divides n_fft, R = n_fft / hop
  shifted views of hop-sized blocks concatenated: the same values as a gather, which XLA CPU runs
  several times slower (Griffin-Lim frames the signal 64 times)."""
  if n_fft % hop:
    return x[..., _frame_index(num_frames, n_fft, hop)]
  r = n_fft // hop
  blocks = x[..., :(num_frames + r - 1) * hop].reshape(x.shape[:-1] + (num_frames + r - 1, hop))
  return jnp.concatenate([blocks[..., i:i + num_frames, :] for i in range(r)], axis=-1)


def _overlap_add(frames: Array, hop: int) -> Array:
  """(..., T, n_fft) -> (..., (T - 1) * hop + n_fft): frames summed at `hop` offsets; shifted adds of
  hop-sized blocks when hop divides n_fft, instead of a scatter-add (slow on XLA CPU)."""
  t, n = frames.shape[-2:]
  batch = frames.shape[:-2]
  if n % hop:
    index = _frame_index(t, n, hop).reshape(-1)
    return jnp.zeros(batch + ((t - 1) * hop + n,), frames.dtype).at[..., index].add(frames.reshape(batch + (-1,)))
  r = n // hop
  blocks = frames.reshape(batch + (t, r, hop))
  pad = [(0, 0)] * len(batch)
  out = sum(jnp.pad(blocks[..., i, :], pad + [(i, r - 1 - i), (0, 0)]) for i in range(r))  # (..., T + R - 1, hop)
  return out.reshape(batch + (-1,))


def stft(cfg: MelConfig, wave: Array, window: Array | None = None) -> Array:
  """One-sided STFT as MMAudio takes it: reflect pad, no centring, unnormalised.

  wave (..., L) -> (..., L // hop, n_freq) complex.
  """
  window = hann_window(cfg.n_fft) if window is None else window
  p = cfg.padding
  if wave.shape[-1] <= p:
    raise ValueError(f'stft: waveform of {wave.shape[-1]} samples is too short to reflect-pad by {p}')
  padded = jnp.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(p, p)], mode='reflect')
  frames = _frames(padded, wave.shape[-1] // cfg.hop_length, cfg.n_fft, cfg.hop_length)
  return jnp.fft.rfft(frames * jnp.asarray(window, wave.dtype), axis=-1)  # (..., T, n_freq)


def istft(cfg: MelConfig, spec: Array, window: Array | None = None) -> Array:
  """Least-squares inverse of `stft` (weighted overlap-add): (..., T, n_freq) -> (..., T * hop)."""
  window = jnp.asarray(hann_window(cfg.n_fft) if window is None else window)
  num_frames = spec.shape[-2]
  frames = jnp.fft.irfft(spec, n=cfg.n_fft, axis=-1)
  window = window.astype(frames.dtype)
  summed = _overlap_add(frames * window, cfg.hop_length)
  norm = _overlap_add(jnp.broadcast_to(window ** 2, (num_frames, cfg.n_fft)), cfg.hop_length)
  wave = summed / jnp.where(norm > 1e-8, norm, 1.0)
  p = cfg.padding
  return wave[..., p:p + num_frames * cfg.hop_length]


def mel_spectrogram(cfg: MelConfig, wave: Array, window: Array | None = None,
                    basis: Array | None = None) -> Array:
  """MMAudio's MelConverter: wave (..., L) -> log-mel (..., L // hop, n_mels), channels last.

  `window` and `basis` default to the reference float32 constants; they stay float32 in float64
  runs, as in the original.
  """
  basis = jnp.asarray(mel_basis(cfg) if basis is None else basis).astype(wave.dtype)
  wave = jnp.clip(wave, -1.0, 1.0)
  spec = stft(cfg, wave, window)
  magnitude = jnp.sqrt(jnp.real(spec) ** 2 + jnp.imag(spec) ** 2 + 1e-9)  # (..., T, n_freq)
  mel = jnp.einsum('...tf,mf->...tm', magnitude, basis, precision=jax.lax.Precision.HIGHEST)
  return _LOG[cfg.log](jnp.maximum(mel, cfg.floor))


def mel_to_magnitude(cfg: MelConfig, log_mel: Array, iterations: int = 100) -> Array:
  """Non-negative least-squares STFT magnitude for a log-mel (..., T, n_mels) -> (..., T, n_freq).

  Multiplicative updates (the NMF rule with the filterbank fixed) keep every bin >= 0, which a
  pseudo-inverse does not; this is what librosa's `mel_to_stft` solves with NNLS.
  """
  basis = jnp.asarray(mel_basis(cfg)).astype(log_mel.dtype)  # (M, F)
  mel = _EXP[cfg.log](log_mel)
  target = jnp.einsum('...tm,mf->...tf', mel, basis)
  eps = jnp.finfo(log_mel.dtype).tiny

  def update(_, magnitude):  # magnitude @ (B^T B) as two thin products: (T, F) -> (T, M) -> (T, F)
    return magnitude * target / ((magnitude @ basis.T) @ basis + eps)

  start = jnp.maximum(target, 0.0) / (jnp.sum(basis, axis=0) ** 2 + eps) + eps
  return jax.lax.fori_loop(0, iterations, update, start)


def griffin_lim(cfg: MelConfig, magnitude: Array, iterations: int = 64, momentum: float = 0.99,
                seed: int = 0) -> Array:
  """Fast Griffin-Lim (Perraudin et al. 2013, as in librosa) for our STFT convention.

  magnitude (..., T, n_freq) -> wave (..., T * hop). Random initial phases from `seed`: one (T, n_freq)
  draw shared by every signal of the batch, so a signal's wave does not depend on its batch position
  (and the two ears of a clip start from the same phases).
  """
  phase = jax.random.uniform(jax.random.key(seed), magnitude.shape[-2:], magnitude.dtype, 0, 2 * np.pi)
  angles = jnp.broadcast_to(jnp.exp(1j * phase), magnitude.shape)
  eps = jnp.finfo(magnitude.dtype).tiny

  def step(_, carry):
    angles, previous = carry
    rebuilt = stft(cfg, istft(cfg, magnitude * angles))
    angles = rebuilt - (momentum / (1 + momentum)) * previous
    return angles / (jnp.abs(angles) + eps), rebuilt

  angles, _ = jax.lax.fori_loop(0, iterations, step, (angles, jnp.zeros_like(angles)))
  return istft(cfg, magnitude * angles)


def mel_to_wave(cfg: MelConfig, log_mel: Array, iterations: int = 64, seed: int = 0) -> Array:
  """Griffin-Lim vocoder: log-mel (..., T, n_mels) -> wave (..., T * hop), clipped to [-1, 1]."""
  return jnp.clip(griffin_lim(cfg, mel_to_magnitude(cfg, log_mel), iterations, seed=seed), -1.0, 1.0)
