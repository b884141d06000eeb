"""Quality metrics with pluggable embedding networks: Fréchet distance and KL divergence per ear.

ViSAudio reports av-benchmark's metrics computed on each ear and averaged (the paper's "avg"
columns, `spec/spatial_metrics.md` §1.5): FD_VGG^avg, KL_PANN^avg. This module is that plumbing:
an `Embedder` turns mono waveforms (N, L) at its own sample rate into embeddings and optionally
class logits; `ear_features` runs it on each ear of binaural clips; `frechet_per_ear` and
`kl_per_ear` compute the §1.3 formulas per ear and their mean.

- FD (§1.3, `metrics/fad.py`): ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2) between the
  embedding sets (unpaired), via `spatial.frechet_distance`. An embedder returning one vector per
  clip (N, D) gives one row per clip (FD_PANNs style); one returning per-frame vectors (N, T, D) is
  pooled as its `pooling` says: 'frames' stacks every frame of every clip as rows (FD_VGG, ~8 rows
  per 8-s clip), 'mean' averages over T first.
- KL (§1.3, `metrics/kl.py`): per clip KL(softmax(ref logits) || softmax(gen logits)) over the
  classes, averaged over clips (paired).

Built-in embedders (`EMBEDDERS`, `get_embedder`):
- 'mel_stats': mean and standard deviation over time of a 64-bin log-mel (PANNs' front end: 16 kHz,
  512-point window, hop 160, 50-8000 Hz), 128-d per clip; its "logits" are the log mean mel power
  per band, so its KL compares the clips' spectral energy distributions. It needs no weights and runs
  anywhere, which is its only purpose: it is **not a perceptual or semantic embedding**, and its
  numbers are not comparable with any published FD or KL. It tracks gross spectral/timbral drift.
- VGGish and PANNs Cnn14 (the numbers papers report) need ports of those networks and their
  checkpoints; they come later and register here under 'vggish' and 'panns' (`register_embedder`).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax.audio import mel as mel_lib
from visaudio_jax.eval.spatial import frechet_distance

__all__ = ['Embedder', 'EMBEDDERS', 'register_embedder', 'get_embedder', 'get_embedders', 'resample', 'ear_features',
           'frechet', 'frechet_rows', 'frechet_per_ear', 'kl_per_clip', 'kl_per_ear', 'quality_metrics']

POOLINGS = ('frames', 'mean')


@dataclasses.dataclass(frozen=True)
class Embedder:
  """A mono audio embedding network at a fixed sample rate.

  embed_fn: float32 (N, L) -> (N, D) clip embeddings or (N, T, D) frame embeddings.
  logits_fn: optional float32 (N, L) -> (N, K) class logits (for KL); None when the network has none.
  pooling: how (N, T, D) frame embeddings become Fréchet rows ('frames' or 'mean', see the module doc).
  """
  name: str
  sample_rate: int
  embed_fn: Callable[[np.ndarray], np.ndarray]
  logits_fn: Callable[[np.ndarray], np.ndarray] | None = None
  pooling: str = 'frames'
  description: str = ''

  def __post_init__(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f'Embedder {self.name!r}: pooling must be one of {POOLINGS}, got {self.pooling!r}')

  @property
  def has_logits(self) -> bool:
    return self.logits_fn is not None

  def embed(self, wave: np.ndarray) -> np.ndarray:
    """(N, L) at `sample_rate` -> float64 (N, D) or (N, T, D)."""
    out = np.asarray(self.embed_fn(np.asarray(wave, np.float32)), np.float64)
    if out.ndim not in (2, 3) or out.shape[0] != len(wave):
      raise ValueError(f'embedder {self.name!r}: expected (N, D) or (N, T, D) for {len(wave)} waveforms, '
                       f'got {out.shape}')
    return out

  def logits(self, wave: np.ndarray) -> np.ndarray:
    """(N, L) at `sample_rate` -> float64 (N, K)."""
    if self.logits_fn is None:
      raise ValueError(f'embedder {self.name!r} has no class logits')
    out = np.asarray(self.logits_fn(np.asarray(wave, np.float32)), np.float64)
    if out.ndim != 2 or out.shape[0] != len(wave):
      raise ValueError(f'embedder {self.name!r}: expected logits (N, K) for {len(wave)} waveforms, got {out.shape}')
    return out


# --- the built-in embedder ------------------------------------------------------------------------------

MEL_STATS = mel_lib.MelConfig(sample_rate=16000, n_fft=512, hop_length=160, n_mels=64, fmin=50.0, fmax=8000.0,
                              log='ln')


@functools.partial(jax.jit, static_argnums=0)
def _mel_stats(cfg: mel_lib.MelConfig, wave: jax.Array) -> tuple[jax.Array, jax.Array]:
  log_mel = mel_lib.mel_spectrogram(cfg, wave)  # (N, T, M), ln of the mel magnitude
  embedding = jnp.concatenate([jnp.mean(log_mel, 1), jnp.std(log_mel, 1)], -1)  # (N, 2M)
  band_power = jnp.mean(jnp.exp(2.0 * log_mel), 1)  # mean mel power per band
  return embedding, jnp.log(band_power)


def mel_stats_embedder(cfg: mel_lib.MelConfig = MEL_STATS) -> Embedder:
  """The weight-free built-in (see the module doc): (N, L) -> 2 n_mels stats, logits = log band power."""
  return Embedder(
      name='mel_stats', sample_rate=cfg.sample_rate,
      embed_fn=lambda w: _mel_stats(cfg, jnp.asarray(w))[0],
      logits_fn=lambda w: _mel_stats(cfg, jnp.asarray(w))[1], pooling='mean',
      description=f'mean+std over time of a {cfg.n_mels}-bin log-mel at {cfg.sample_rate} Hz; not perceptual')


EMBEDDERS: dict[str, Callable[[], Embedder]] = {'mel_stats': mel_stats_embedder}


def register_embedder(name: str, factory: Callable[[], Embedder]) -> None:
  """Makes `get_embedder(name)` call `factory()` (e.g. a VGGish port loading its checkpoint)."""
  EMBEDDERS[name] = factory


@functools.lru_cache(maxsize=None)
def _cached(name: str) -> Embedder:
  return EMBEDDERS[name]()


def get_embedder(name: str | Embedder) -> Embedder:
  """A registered embedder by name (built once, then cached), or an `Embedder` passed through."""
  if isinstance(name, Embedder):
    return name
  if name not in EMBEDDERS:
    raise ValueError(f'unknown embedder {name!r}; known: {sorted(EMBEDDERS)} (VGGish/PANNs ports are not '
                     'in yet; register_embedder adds one)')
  return _cached(name)


# --- per-ear computation --------------------------------------------------------------------------------


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
  """Resamples along the last axis (soxr_hq via librosa, as `codec.prepare_waveform`); float32."""
  if orig_sr == target_sr:
    return np.asarray(wave, np.float32)
  import librosa  # heavy; only when a rate differs
  return librosa.resample(np.asarray(wave, np.float64), orig_sr=orig_sr, target_sr=target_sr, res_type='soxr_hq',
                          axis=-1).astype(np.float32)


def ear_features(embedder: Embedder, wave: np.ndarray, sample_rate: int) -> dict[str, np.ndarray | None]:
  """Binaural (B, E, L) at `sample_rate` (E = 2 ears, or 1 for a mono signal) -> per-ear outputs:
  'embedding' (B, E, D) or (B, E, T, D), 'logits' (B, E, K) or None. Resampled to the embedder's rate."""
  wave = np.asarray(wave)
  b, e = wave.shape[:2]
  flat = resample(wave.reshape(b * e, -1), sample_rate, embedder.sample_rate)
  emb = embedder.embed(flat)
  logits = embedder.logits(flat) if embedder.has_logits else None
  return {'embedding': emb.reshape((b, e) + emb.shape[1:]),
          'logits': None if logits is None else logits.reshape(b, e, -1)}


def frechet_rows(embedding: np.ndarray, pooling: str = 'frames') -> np.ndarray:
  """One ear's embeddings (N, D) or (N, T, D) -> the Fréchet set's rows (see the module doc)."""
  embedding = np.asarray(embedding)
  if embedding.ndim == 2:
    return embedding
  if pooling == 'mean':
    return embedding.mean(1)
  return embedding.reshape(-1, embedding.shape[-1])


@jax.jit
def _frechet(x, y):
  return frechet_distance(x, y)


def frechet(x: np.ndarray, y: np.ndarray) -> float:
  """`spatial.frechet_distance` of two sets of rows, in float64: with fewer rows than dimensions the
  covariances are near-singular and float32 rounding would move the result by percents."""
  with jax.enable_x64(True):
    return float(_frechet(jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)))


def frechet_per_ear(generated: np.ndarray, reference: np.ndarray, pooling: str = 'frames') -> dict[str, float]:
  """Embeddings (N, 2, ...) of two sets -> FD per ear ('left', 'right') and their mean ('avg').
  NaN when a set has fewer than 2 rows (no covariance)."""
  out = {}
  for ear, name in enumerate(('left', 'right')):
    x, y = frechet_rows(generated[:, ear], pooling), frechet_rows(reference[:, ear], pooling)
    if len(x) < 2 or len(y) < 2:
      out[name] = float('nan')
      continue
    out[name] = frechet(x, y)
  out['avg'] = 0.5 * (out['left'] + out['right'])
  return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_per_clip(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Logits (..., K) of paired clips -> KL(softmax(reference) || softmax(generated)) (...), nats."""
  log_p, log_q = _log_softmax(np.asarray(reference, np.float64)), _log_softmax(np.asarray(generated, np.float64))
  return np.sum(np.exp(log_p) * (log_p - log_q), -1)


def kl_per_ear(generated: np.ndarray, reference: np.ndarray) -> dict[str, float]:
  """Logits (N, 2, K) of paired clips -> mean KL over clips per ear ('left', 'right') and 'avg'."""
  kl = kl_per_clip(generated, reference)  # (N, 2)
  left, right = float(kl[:, 0].mean()), float(kl[:, 1].mean())
  return {'left': left, 'right': right, 'avg': 0.5 * (left + right)}


def quality_metrics(embedder: Embedder, generated: dict, reference: dict) -> dict[str, float]:
  """`ear_features` of two sets -> fd_<name>_{left,right} and fd_<name> (avg), and the same for kl_
  when the embedder has logits."""
  name = embedder.name
  out = {}
  fd = frechet_per_ear(generated['embedding'], reference['embedding'], embedder.pooling)
  out.update({f'fd_{name}_left': fd['left'], f'fd_{name}_right': fd['right'], f'fd_{name}': fd['avg']})
  if generated['logits'] is not None and reference['logits'] is not None:
    kl = kl_per_ear(generated['logits'], reference['logits'])
    out.update({f'kl_{name}_left': kl['left'], f'kl_{name}_right': kl['right'], f'kl_{name}': kl['avg']})
  return out


def get_embedders(embedders: Sequence[str | Embedder]) -> list[Embedder]:
  """Embedders by name or instance, duplicates rejected."""
  out = [get_embedder(e) for e in embedders]
  seen = [e.name for e in out]
  if len(set(seen)) != len(seen):
    raise ValueError(f'embedders given twice: {seen}')
  return out
