"""Network configuration: the `model` block of a config file, and the sequence lengths it implies.

Config files (`configs/*.py`) are `ml_collections.ConfigDict`s, convenient on the command line; Flax
modules need hashable attributes, so the network sees a frozen `NetworkConfig` built from them.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections

SPEC_FIELDS = ('enabled', 'pe_dim', 'grid_h', 'grid_w', 'fps', 'pool_dim', 'pool_heads')


@dataclasses.dataclass(frozen=True)
class SpacetimeConfig:
  """Conditional spacetime module: Perception Encoder spatial tokens -> per-ear conditions."""
  enabled: bool = False
  pe_dim: int = 768  # D_pe: width of the Perception Encoder patch tokens
  grid_h: int = 14  # patch grid of one PE frame
  grid_w: int = 14
  fps: float = 4.0  # PE frames per second of video
  pool_dim: int = 256  # width of the per-ear attention pooling
  pool_heads: int = 4


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
  """Everything that fixes the flow network's parameters, numerics and sequence lengths."""
  latent_dim: int  # C, VAE latent channels
  clip_dim: int
  sync_dim: int
  text_dim: int
  hidden_dim: int  # D
  depth: int  # joint + fused blocks
  fused_depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  v2: bool = False  # MMAudio v2: SiLU input projections, high-frequency timestep embedding
  # Sequence lengths follow from the clip duration and the audio/video rates...
  duration_s: float = 8.0
  sample_rate: int = 16000
  hop_length: int = 256  # mel hop
  latent_downsample: int = 2  # mel frames per latent frame
  clip_fps: float = 8.0
  sync_fps: float = 25.0
  sync_segment_frames: int = 16
  sync_segment_step: int = 8
  sync_downsample: int = 2
  text_seq_len: int = 77
  # ...unless pinned here (the tiny golden nets use lengths no duration gives).
  latent_seq_len: int | None = None
  clip_seq_len: int | None = None
  sync_seq_len: int | None = None
  # ViSAudio extensions.
  channels: int = 2  # ears; 1 with spacetime disabled is MMAudio
  branch_weights: str = 'separate'  # 'separate' per-ear weights | 'shared' + learned ear embedding
  joint_mode: str = 'concat'  # 'concat' | 'sequential'
  spacetime: SpacetimeConfig = SpacetimeConfig()
  # Numerics and memory.
  dtype: str = 'float32'  # compute dtype
  param_dtype: str = 'float32'
  matmul_precision: str = 'default'  # 'default' | 'high' | 'highest'
  attention_impl: str = 'reference'  # 'reference' (einsum, f32 softmax) | 'xla' | 'cudnn'
  remat_policy: str = 'none'  # 'none' | 'full' | 'dots' | 'dots_no_batch'
  scan_layers: bool = False

  def __post_init__(self):
    checks = [
        (self.hidden_dim % self.num_heads == 0, 'hidden_dim must be a multiple of num_heads'),
        ((self.hidden_dim // max(self.num_heads, 1)) % 2 == 0, 'head dim must be even (RoPE pairs)'),
        (0 <= self.fused_depth < self.depth, 'need 0 <= fused_depth < depth (>= 1 joint block)'),
        (self.channels >= 1, 'channels must be >= 1'),
        (self.branch_weights in ('separate', 'shared'), "branch_weights: 'separate' or 'shared'"),
        (self.joint_mode in ('concat', 'sequential'), "joint_mode: 'concat' or 'sequential'"),
        (self.attention_impl in ('reference', 'xla', 'cudnn'), 'attention_impl unknown'),
        (self.remat_policy in REMAT_POLICIES, f'remat_policy must be one of {sorted(REMAT_POLICIES)}'),
        (self.matmul_precision in ('default', 'high', 'highest'), 'matmul_precision unknown'),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(f'NetworkConfig: {msg}')

  @property
  def head_dim(self) -> int:
    return self.hidden_dim // self.num_heads

  @property
  def num_joint_blocks(self) -> int:
    return self.depth - self.fused_depth

  @property
  def mlp_hidden_dim(self) -> int:
    """SwiGLU width as MMAudio computes it: int(2/3 * ratio * D) rounded up to a multiple of 256."""
    hidden = int(2 * int(self.hidden_dim * self.mlp_ratio) / 3)
    return 256 * ((hidden + 255) // 256)

  @property
  def per_ear_branches(self) -> int:
    """Leading ear axis of branch params: `channels` for separate weights, 0 (none) for shared."""
    return self.channels if self.branch_weights == 'separate' else 0

  def seq_lens(self) -> 'SeqLens':
    return sequence_lengths(self)


# remat_policy -> what jax.checkpoint may keep ('none': no rematerialisation at all).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class SeqLens:
  latent: int  # N
  clip: int
  sync: int
  text: int
  pe: int  # Perception Encoder frames
  audio_samples: int  # waveform samples the latent covers


def sequence_lengths(cfg: NetworkConfig) -> SeqLens:
  """MMAudio's `SequenceConfig` rules, for any duration (8 s is a default, not a limit)."""
  d = cfg.duration_s
  latent = math.ceil(d * cfg.sample_rate / cfg.hop_length / cfg.latent_downsample)
  clip = int(d * cfg.clip_fps)
  segments = (d * cfg.sync_fps - cfg.sync_segment_frames) // cfg.sync_segment_step + 1
  sync = int(segments * cfg.sync_segment_frames / cfg.sync_downsample)
  lens = SeqLens(
      latent=cfg.latent_seq_len or latent,
      clip=cfg.clip_seq_len or clip,
      sync=cfg.sync_seq_len or sync,
      text=cfg.text_seq_len,
      pe=max(1, int(d * cfg.spacetime.fps)),
      audio_samples=(cfg.latent_seq_len or latent) * cfg.hop_length * cfg.latent_downsample)
  per_segment = cfg.sync_segment_frames // cfg.sync_downsample
  if min(lens.latent, lens.clip, lens.sync, lens.text) < 1 or lens.sync % per_segment:
    raise ValueError(f'duration_s={d} gives unusable sequence lengths {lens} (sync must be a '
                     f'positive multiple of {per_segment}; the sync encoder needs '
                     f'>= {cfg.sync_segment_frames / cfg.sync_fps:.2f} s)')
  return lens


def network_config(model: ml_collections.ConfigDict | dict) -> NetworkConfig:
  """Builds the frozen config from a config file's `model` block (unknown keys are an error)."""
  fields = dict(model)
  spacetime = dict(fields.pop('spacetime', {}) or {})
  unknown = set(fields) - {f.name for f in dataclasses.fields(NetworkConfig)}
  unknown |= {'spacetime.' + k for k in set(spacetime) - set(SPEC_FIELDS)}
  if unknown:
    raise ValueError(f'unknown model config keys: {sorted(unknown)}')
  return NetworkConfig(**fields, spacetime=SpacetimeConfig(**spacetime))


def to_config_dict(cfg: NetworkConfig) -> ml_collections.ConfigDict:
  """Inverse of `network_config`, for writing a run's config next to its checkpoint."""
  return ml_collections.ConfigDict(dataclasses.asdict(cfg))
