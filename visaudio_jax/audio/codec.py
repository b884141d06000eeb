"""The audio codec between waveforms and the flow model's latents, for one ear or both.

Two kinds:
- 'vae': MMAudio's path, wave -> log-mel -> VAE posterior (B, T / 2, E); latent -> VAE decoder ->
  log-mel -> BigVGAN vocoder -> wave. Presets `mmaudio_16k`, `mmaudio_44k`.
- 'mel': the identity codec of the `tiny` config: the latent is the affinely normalised log-mel
  itself (std 0), decoded with Griffin-Lim, so CPU demos need no pretrained weights.

`encode_binaural` / `decode_binaural` fold the ear axis into the batch so both ears run through the
mono codec in one call. They are pure and jit-able; `prepare_waveform` is the host-side gate that
checks user audio (shape, channels, finiteness, length, sample rate) and resamples on request.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax.audio import mel as mel_lib
from visaudio_jax.audio import vocoder as vocoder_lib
from visaudio_jax.audio.mel import MelConfig
from visaudio_jax.audio.vae import VAE, VAE_16K, VAE_44K, Posterior, VAEConfig, init_vae
from visaudio_jax.audio.vocoder import VocoderConfig

Array = jax.Array
KINDS = ('vae', 'mel')


@dataclasses.dataclass(frozen=True)
class CodecConfig:
  kind: str
  mel: MelConfig
  vae: VAEConfig | None = None
  vocoder: VocoderConfig | None = None
  mel_offset: float = 0.0  # 'mel' kind: latent = (log_mel - mel_offset) / mel_scale
  mel_scale: float = 1.0
  griffin_lim_iterations: int = 64

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'CodecConfig.kind must be one of {KINDS}, got {self.kind!r}')
    if self.kind == 'vae':
      if self.vae is None or self.vocoder is None:
        raise ValueError("CodecConfig(kind='vae') needs both a VAE and a vocoder config")
      if self.vae.data_dim != self.mel.n_mels or self.vocoder.num_mels != self.mel.n_mels:
        raise ValueError(f'mel bins disagree: front end {self.mel.n_mels}, VAE {self.vae.data_dim}, '
                         f'vocoder {self.vocoder.num_mels}')
      if self.vocoder.hop_length != self.mel.hop_length:
        raise ValueError(f'vocoder upsamples x{self.vocoder.hop_length}, but the mel hop is {self.mel.hop_length}')

  @property
  def sample_rate(self) -> int:
    return self.mel.sample_rate

  @property
  def latent_dim(self) -> int:
    return self.vae.embed_dim if self.kind == 'vae' else self.mel.n_mels

  @property
  def latent_downsample(self) -> int:
    """Mel frames per latent frame."""
    return self.vae.downsample if self.kind == 'vae' else 1

  @property
  def samples_per_latent(self) -> int:
    return self.mel.hop_length * self.latent_downsample

  @property
  def min_samples(self) -> int:
    return max(self.samples_per_latent, self.mel.padding + 1)


TINY_MEL = MelConfig(sample_rate=16000, n_fft=1024, hop_length=256, n_mels=32, fmax=8000.0, log='log10')
CODEC_PRESETS: dict[str, CodecConfig] = {
    'mmaudio_16k': CodecConfig('vae', mel_lib.MEL_16K, VAE_16K, vocoder_lib.BIGVGAN_16K),
    'mmaudio_44k': CodecConfig('vae', mel_lib.MEL_44K, VAE_44K, vocoder_lib.BIGVGAN_V2_44K),
    # log10 mel floor is -5 and loud bins reach ~+1: this maps the range to about [-1, 1].
    'tiny_mel': CodecConfig('mel', TINY_MEL, mel_offset=-2.0, mel_scale=3.0),
}


def codec_config(name: str) -> CodecConfig:
  if name not in CODEC_PRESETS:
    raise ValueError(f'unknown codec preset {name!r}; expected one of {sorted(CODEC_PRESETS)}')
  return CODEC_PRESETS[name]


def init_codec(cfg: CodecConfig, seed: int = 0) -> dict:
  """Seeded random codec params ({} for the 'mel' kind, which has none)."""
  if cfg.kind == 'mel':
    return {}
  return {'vae': init_vae(cfg.vae, seed), 'vocoder': vocoder_lib.init_vocoder(cfg.vocoder, seed + 1)}


def encode(cfg: CodecConfig, params: dict, wave: Array, dtype: Any = None) -> Posterior:
  """Mono waveforms (B, L) -> latent posterior, mean and std (B, L // samples_per_latent, C)."""
  log_mel = mel_lib.mel_spectrogram(cfg.mel, wave)  # (B, T, n_mels)
  if cfg.kind == 'mel':
    mean = (log_mel - cfg.mel_offset) / cfg.mel_scale
    return Posterior(mean, jnp.zeros_like(mean))
  post = VAE(cfg.vae, dtype=dtype).apply({'params': params['vae']}, log_mel, method=VAE.encode)
  return Posterior(post.mean.astype(wave.dtype), post.std.astype(wave.dtype))


def decode(cfg: CodecConfig, params: dict, latents: Array, dtype: Any = None, seed: int = 0) -> Array:
  """Latents (B, N, C) -> mono waveforms (B, N * samples_per_latent)."""
  if latents.shape[-1] != cfg.latent_dim:
    raise ValueError(f'decode: latents have {latents.shape[-1]} channels, the codec expects {cfg.latent_dim}')
  if cfg.kind == 'mel':
    log_mel = latents * cfg.mel_scale + cfg.mel_offset
    return mel_lib.mel_to_wave(cfg.mel, log_mel, cfg.griffin_lim_iterations, seed)
  log_mel = VAE(cfg.vae, dtype=dtype).apply({'params': params['vae']}, latents, method=VAE.decode)
  return vocoder_lib.vocode(cfg.vocoder, params['vocoder'], log_mel, dtype=dtype).astype(latents.dtype)


def encode_binaural(cfg: CodecConfig, params: dict, wave: Array, dtype: Any = None) -> Posterior:
  """(B, E, L) waveforms, E ears -> posterior (B, E, N, C); all ears in one batched call."""
  b, ears, length = wave.shape
  post = encode(cfg, params, wave.reshape(b * ears, length), dtype)
  return Posterior(*(x.reshape((b, ears) + x.shape[1:]) for x in post))


def decode_binaural(cfg: CodecConfig, params: dict, latents: Array, dtype: Any = None, seed: int = 0) -> Array:
  """(B, E, N, C) latents -> (B, E, N * samples_per_latent) waveforms in one batched call."""
  b, ears = latents.shape[:2]
  wave = decode(cfg, params, latents.reshape((b * ears,) + latents.shape[2:]), dtype, seed)
  return wave.reshape(b, ears, -1)


def prepare_waveform(wave: Any, sample_rate: int, cfg: CodecConfig, *, channels: int = 2,
                     resample: bool = False, name: str = 'audio') -> np.ndarray:
  """Check user audio and bring it to the codec's rate: (B, channels, L) or (channels, L) -> float32
  (B, channels, L'). Raises ValueError naming `name` and what was expected."""
  wave = np.asarray(wave)
  if wave.ndim == 2:
    wave = wave[None]
  layout = f'(batch, {channels}, samples) or ({channels}, samples)'
  if wave.ndim != 3 or wave.shape[1] != channels:
    kind = {1: 'mono', 2: 'stereo'}.get(channels, f'{channels}-channel')
    raise ValueError(f'{name}: expected {kind} audio shaped {layout}, got shape {tuple(np.shape(wave))}')
  if not np.issubdtype(wave.dtype, np.floating):
    raise ValueError(f'{name}: expected float samples in [-1, 1], got dtype {wave.dtype}')
  if not np.isfinite(wave).all():
    raise ValueError(f'{name}: contains NaN or Inf samples')
  if sample_rate != cfg.sample_rate:
    if not resample:
      raise ValueError(f'{name}: sample rate {sample_rate} Hz, but the codec runs at {cfg.sample_rate} Hz; '
                       f'pass resample=True to resample it')
    import librosa  # soxr resampling; librosa is heavy, so imported only when needed
    wave = librosa.resample(wave.astype(np.float64), orig_sr=sample_rate, target_sr=cfg.sample_rate,
                            res_type='soxr_hq', axis=-1)
  if wave.shape[-1] < cfg.min_samples:
    raise ValueError(f'{name}: {wave.shape[-1]} samples at {cfg.sample_rate} Hz is too short; the codec '
                     f'needs at least {cfg.min_samples} ({cfg.min_samples / cfg.sample_rate * 1000:.1f} ms)')
  return wave.astype(np.float32)


def check_matches_network(cfg: CodecConfig, net) -> None:
  """The flow network's latent layout must be the codec's (`net`: a model NetworkConfig)."""
  ours = (cfg.latent_dim, cfg.sample_rate, cfg.mel.hop_length, cfg.latent_downsample)
  theirs = (net.latent_dim, net.sample_rate, net.hop_length, net.latent_downsample)
  if ours != theirs:
    raise ValueError(f'codec and model disagree on (latent_dim, sample_rate, hop_length, latent_downsample): '
                     f'codec {ours}, model {theirs}')
