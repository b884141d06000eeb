"""MMAudio's network presets (`mmaudio/model/networks.py`), the single source for configs/*.py."""
from __future__ import annotations

import ml_collections

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


def model_config(preset: str, mono: bool = False) -> ml_collections.ConfigDict:
  """A config file's `model` block: the MMAudio preset, binaural (ViSAudio) unless `mono`."""
  if preset not in MMAUDIO_PRESETS:
    raise ValueError(f'unknown preset {preset!r}; expected one of {sorted(MMAUDIO_PRESETS)}')
  model = dict(MMAUDIO_PRESETS[preset])
  if mono:
    model.update(channels=1, spacetime=dict(DEFAULT_SPACETIME, enabled=False))
  else:
    model.update(channels=2, branch_weights='separate', joint_mode='concat', spacetime=dict(DEFAULT_SPACETIME))
  model.update(dtype='float32', param_dtype='float32', matmul_precision='default',
               attention_impl='reference', remat_policy='none', scan_layers=False)
  return ml_collections.ConfigDict(model)
