"""The architecture table: MMAudio's five network sizes (`mmaudio/model/networks.py`) and the tiny CPU
net, each with its conditional spacetime module. Experiments (data, optimiser, evaluators, ...) are
written in `configs/`; this table only fixes the network."""
from __future__ import annotations

import dataclasses

import ml_collections

from visaudio_jax.model.config import NetworkConfig

NUMERICS_FIELDS = ('dtype', 'param_dtype', 'matmul_precision', 'attention_impl', 'remat_policy', 'scan_layers')

_16K = dict(latent_dim=20, sample_rate=16000, hop_length=256)
_44K = dict(latent_dim=40, sample_rate=44100, hop_length=512)
_COMMON = dict(clip_dim=1024, sync_dim=768, text_dim=1024, mlp_ratio=4.0, duration_s=8.0)
# Default conditional spacetime module: PE-Spatial-B16 tokens (768-d) at 224 px (14 x 14), 4 fps.
_SPACETIME = dict(enabled=True, pe_dim=768, grid_h=14, grid_w=14, fps=4.0, pool_dim=256, pool_heads=4)

ARCHITECTURES: dict[str, dict] = {
    'small_16k': dict(_COMMON, **_16K, hidden_dim=448, depth=12, fused_depth=8, num_heads=7, spacetime=_SPACETIME),
    'small_44k': dict(_COMMON, **_44K, hidden_dim=448, depth=12, fused_depth=8, num_heads=7, spacetime=_SPACETIME),
    'medium_44k': dict(_COMMON, **_44K, hidden_dim=896, depth=12, fused_depth=8, num_heads=14,
                       spacetime=_SPACETIME),
    'large_44k': dict(_COMMON, **_44K, hidden_dim=896, depth=21, fused_depth=14, num_heads=14,
                      spacetime=_SPACETIME),
    'large_44k_v2': dict(_COMMON, **_44K, hidden_dim=896, depth=21, fused_depth=14, num_heads=14, v2=True,
                         spacetime=_SPACETIME),
    'tiny': dict(
        # Identity codec: the latent is 32 normalised log-mel bins at the mel frame rate.
        latent_dim=32, sample_rate=16000, hop_length=256, latent_downsample=1, duration_s=2.0,
        clip_dim=64, sync_dim=48, text_dim=64, text_seq_len=16,
        hidden_dim=64, depth=4, fused_depth=2, num_heads=2, mlp_ratio=4.0,
        spacetime=dict(enabled=True, pe_dim=32, grid_h=4, grid_w=4, fps=4.0, pool_dim=32, pool_heads=2)),
}
MMAUDIO_SIZES = tuple(name for name in ARCHITECTURES if name != 'tiny')


def model_config(name: str, mono: bool = False) -> ml_collections.ConfigDict:
  """A config file's `model` block for architecture `name`: binaural (ViSAudio) unless `mono`, which
  is MMAudio itself (one ear, no spacetime module)."""
  if name not in ARCHITECTURES:
    raise ValueError(f'unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}')
  model = dict(ARCHITECTURES[name])
  spacetime = model.pop('spacetime')
  if mono:
    model.update(channels=1, spacetime=dict(spacetime, enabled=False))
  else:
    model.update(channels=2, branch_weights='separate', joint_mode='concat', spacetime=dict(spacetime))
  # Numerics/memory fields at NetworkConfig's defaults, listed so the command line can override them.
  model.update({f.name: f.default for f in dataclasses.fields(NetworkConfig) if f.name in NUMERICS_FIELDS})
  return ml_collections.ConfigDict(model)
