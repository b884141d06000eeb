"""MMAudio's network presets (`mmaudio/model/networks.py`), the single source for configs/*.py."""
from __future__ import annotations

import dataclasses

import ml_collections

from visaudio_jax.model.config import NetworkConfig

NUMERICS_FIELDS = ('dtype', 'param_dtype', 'matmul_precision', 'attention_impl', 'remat_policy', 'scan_layers')

_16K = dict(latent_dim=20, sample_rate=16000, hop_length=256)
_44K = dict(latent_dim=40, sample_rate=44100, hop_length=512)
_COMMON = dict(clip_dim=1024, sync_dim=768, text_dim=1024, mlp_ratio=4.0, duration_s=8.0)

MMAUDIO_PRESETS: dict[str, dict] = {
    'small_16k': dict(_COMMON, **_16K, hidden_dim=448, depth=12, fused_depth=8, num_heads=7),
    'small_44k': dict(_COMMON, **_44K, hidden_dim=448, depth=12, fused_depth=8, num_heads=7),
    'medium_44k': dict(_COMMON, **_44K, hidden_dim=896, depth=12, fused_depth=8, num_heads=14),
    'large_44k': dict(_COMMON, **_44K, hidden_dim=896, depth=21, fused_depth=14, num_heads=14),
    'large_44k_v2': dict(_COMMON, **_44K, hidden_dim=896, depth=21, fused_depth=14, num_heads=14, v2=True),
}

# Default conditional spacetime module: PE-Spatial-B16 tokens (768-d) at 224 px (14 x 14), 4 fps.
DEFAULT_SPACETIME = dict(enabled=True, pe_dim=768, grid_h=14, grid_w=14, fps=4.0, pool_dim=256, pool_heads=4)


TINY_MODEL = dict(
    # Identity codec: the latent is 32 normalised log-mel bins at the mel frame rate.
    latent_dim=32, sample_rate=16000, hop_length=256, latent_downsample=1, duration_s=2.0,
    clip_dim=64, sync_dim=48, text_dim=64, text_seq_len=16,
    hidden_dim=64, depth=4, fused_depth=2, num_heads=2, mlp_ratio=4.0,
)
TINY_SPACETIME = dict(enabled=True, pe_dim=32, grid_h=4, grid_w=4, fps=4.0, pool_dim=32, pool_heads=2)

PRESETS = {**MMAUDIO_PRESETS, 'tiny': TINY_MODEL}
CODEC_FOR_PRESET = {'tiny': 'tiny_mel', 'small_16k': 'mmaudio_16k'}  # the others: 'mmaudio_44k'


def model_config(preset: str, mono: bool = False) -> ml_collections.ConfigDict:
  """A config file's `model` block: the preset, binaural (ViSAudio) unless `mono`."""
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}; expected one of {sorted(PRESETS)}')
  model = dict(PRESETS[preset])
  spacetime = TINY_SPACETIME if preset == 'tiny' else DEFAULT_SPACETIME
  if mono:
    model.update(channels=1, spacetime=dict(spacetime, enabled=False))
  else:
    model.update(channels=2, branch_weights='separate', joint_mode='concat', spacetime=dict(spacetime))
  # Numerics/memory fields at NetworkConfig's defaults, listed so the command line can override them.
  model.update({f.name: f.default for f in dataclasses.fields(NetworkConfig) if f.name in NUMERICS_FIELDS})
  return ml_collections.ConfigDict(model)


# Logical axis -> mesh axis rules over the mesh ('data', 'fsdp', 'tensor') (MaxText-style).
LOGICAL_AXIS_RULES = (
    ('activation_batch', ('data', 'fsdp')),
    ('activation_ear', None),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('embed', 'fsdp'),
    ('embed_out', 'tensor'),
    ('mlp', 'tensor'),
    # adaLN outputs (6D) are split into shift/scale/gate chunks. Sharding that axis over 'tensor'
    # on a mesh whose data, fsdp and tensor axes all exceed 1 miscompiles on XLA CPU (jax 0.10.2;
    # tests/test_sharding.py keeps a strict xfail on it), so those weights are only FSDP-sharded.
    ('modulation', None),
    ('heads', 'tensor'),
    ('heads_merged', 'tensor'),
    ('head_dim', None),
    ('qkv', None),
    ('cond', None),
    ('latent', None),
    ('conv_window', None),
    ('ear', None),
    ('layers', None),
)

FLAGS = ('mono', 'scan', 'remat', 'bf16', 'cudnn', 'sequential', 'shared')


def experiment_config(preset: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """A whole config file: model, flow matching, sampling, sharding. `arg` is a comma-separated list
  of flags: mono (MMAudio itself), scan (nn.scan over blocks), remat (full rematerialisation),
  bf16 (bfloat16 compute), cudnn (cuDNN fused attention, GPU with bf16), sequential (joint_mode),
  shared (branch_weights)."""
  flags = [f for f in (arg or '').split(',') if f]
  unknown = set(flags) - set(FLAGS)
  if unknown:
    raise ValueError(f'unknown config flags {sorted(unknown)}; known: {FLAGS}')
  model = model_config(preset, mono='mono' in flags)
  model.scan_layers = 'scan' in flags
  model.remat_policy = 'full' if 'remat' in flags else 'none'
  if 'bf16' in flags:
    model.dtype = 'bfloat16'
  if 'cudnn' in flags:
    model.attention_impl = 'cudnn'
  if 'sequential' in flags:
    model.joint_mode = 'sequential'
  if 'shared' in flags:
    model.branch_weights = 'shared'
  config = ml_collections.ConfigDict()
  config.preset = preset
  config.seed = 0
  config.model = model
  config.flow = ml_collections.ConfigDict(dict(
      min_sigma=0.0, t_mean=0.0, t_scale=1.0, null_video_prob=0.1, null_text_prob=0.1,
      cfg_strength=4.5, num_steps=25, method='euler', side_loss_weight=0.0,
      ear_noise_correlation=0.0))
  config.sample = ml_collections.ConfigDict(dict(batch_size=2, negative_prompt=''))
  # Waveform <-> latent codec (visaudio_jax/audio/codec.py); MMAudio presets need the official
  # VAE and vocoder weights to make sound, the tiny config's mel codec needs none.
  config.codec = ml_collections.ConfigDict(dict(preset=CODEC_FOR_PRESET.get(preset, 'mmaudio_44k'),
                                                vae_ckpt='', vocoder_ckpt=''))
  # Conditioning encoders (visaudio_jax/encoders): the tiny config's are seeded; MMAudio's need the
  # official CLIP (open_clip DFN5B), Synchformer and PE-Spatial-B16 checkpoints.
  config.encoders = ml_collections.ConfigDict(dict(preset='tiny' if preset == 'tiny' else 'mmaudio',
                                                   clip_ckpt='', sync_ckpt='', pe_ckpt=''))
  config.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), axes=('data', 'fsdp', 'tensor')))
  config.logical_axis_rules = [list(r) for r in LOGICAL_AXIS_RULES]
  _training_blocks(config, preset)
  return config


def _training_blocks(config: ml_collections.ConfigDict, preset: str) -> None:
  """train.py's blocks: MMAudio's recipe (spec mmaudio.md §5) for the MMAudio sizes, a CPU demo for tiny."""
  from visaudio_jax.train import optim  # the optimiser module owns its defaults

  tiny = preset == 'tiny'
  # Pre-extracted feature shards (data_prep/extract_features.py); `synthetic` builds BiAudio-mini
  # there first when the directory holds no shards (the tiny demo's data).
  config.data = ml_collections.ConfigDict(dict(
      dir='data/biaudio_mini/demo/shards' if tiny else '', train_split='train', eval_split='valid',
      worker_count=0, skip_corrupt=False,
      # The demo's scene: one visible source, no off-screen sound, a still camera and a 120-degree
      # view (sources up to 48 degrees off centre), without the humming class (its ILD stays under
      # 1 dB at any angle): the direction is in the picture and clearly in the sound.
      synthetic=ml_collections.ConfigDict(dict(
          enabled=tiny, clips_dir='data/biaudio_mini/demo/clips', num_clips=700, seed=0,
          scene=ml_collections.ConfigDict(dict(  # data_prep.synthetic.SyntheticConfig fields
              num_objects=(1, 1), offscreen_prob=0.0, fov_deg=120.0, camera_turn_prob=0.0,
              classes=('beeping', 'hissing', 'drumming', 'whistling')))))))
  config.train = ml_collections.ConfigDict(dict(
      global_batch_size=16 if tiny else 512, num_steps=540 if tiny else 300_000, grad_accum_steps=1,
      seed=14159265,  # MMAudio's
      init_from='',  # '' | MMAudio .pth/.safetensors (made binaural) | a previous run's workdir
      log_every=50 if tiny else 100,
      log_batch_ids=False,  # also record each step's clip ids in <workdir>/train_log.jsonl
      compilation_cache_dir=''))  # persistent XLA cache (e.g. ~/.cache/visaudio_jax/xla): faster restarts
  config.optim = optim.default_optim_config()
  config.ema = optim.default_ema_config()
  if tiny:
    config.optim.update(lr=1e-3, warmup_steps=100, decay_steps=[350], decay_factor=0.3)
    # The two binaural options beyond the paper (model/flow_matching.py) that make the 10-minute
    # demo learn direction: without them 600 steps leave the ears' errors independent and the ILD
    # random (60 % side agreement; 80 % with the loss weight alone).
    config.flow.update(side_loss_weight=10.0, ear_noise_correlation=0.95)
  config.checkpoint = ml_collections.ConfigDict(dict(
      every=200 if tiny else 10_000, keep=3, keep_period=0 if tiny else 50_000, async_save=True))
  # Periodic evaluation (0 = off): validation loss on fixed batches, and sampling clips to wav + spatial
  # metrics; then the final held-out check (final_num_samples clips of final_split; the untrained
  # baseline over untrained_draws noise draws per clip, as one draw is a coin flip per clip).
  config.eval = ml_collections.ConfigDict(dict(
      every=200 if tiny else 5000, loss_batches=4, sample_every=0 if tiny else 20_000, num_samples=8,
      ema='sigma_rel_0p05', final_split='test', final_num_samples=70 if tiny else 0,
      lateral_deg=20.0, final_lateral_only=tiny, untrained_draws=4))
