"""Analytic FLOPs of the flow network (matmuls, convolutions and attention; 1 MAC = 2 FLOPs), the
same accounting as torch.utils.flop_counter, for MFU and benchmark tables."""
from __future__ import annotations

from visaudio_jax.model.config import NetworkConfig


def _stream(tokens: int, cond_tokens: int, d: int, hidden: int, kernel: int, pre_only: bool) -> int:
  """One MMDitSingleBlock on `tokens` tokens, adaLN evaluated on `cond_tokens` condition tokens."""
  flops = 2 * cond_tokens * d * (2 if pre_only else 6) * d + 2 * tokens * d * 3 * d
  if not pre_only:
    flops += 2 * tokens * kernel * d * d + 3 * 2 * tokens * kernel * d * hidden
  return flops


def network_flops(cfg: NetworkConfig, batch: int = 1) -> dict[str, int]:
  """{'preprocess_conditions': once per clip, 'predict_flow': per network evaluation}."""
  lens = cfg.seq_lens()
  d, h, e = cfg.hidden_dim, cfg.mlp_hidden_dim, cfg.channels
  n, lc, lt, s = lens.latent, lens.clip, lens.text, lens.sync
  pre = (2 * lc * cfg.clip_dim * d + 3 * 2 * lc * 3 * d * h  # clip: Linear + ConvMLP(k3)
         + 2 * s * 7 * cfg.sync_dim * d + 3 * 2 * s * 3 * d * h  # sync: conv(k7) + ConvMLP(k3)
         + 2 * lt * cfg.text_dim * d + 3 * 2 * lt * d * h  # text: Linear + MLP
         + 2 * 2 * d * d)  # pooled clip/text condition projections
  if cfg.spacetime.enabled:
    st = cfg.spacetime
    tokens = lens.pe * st.grid_h * st.grid_w
    pre += (2 * tokens * st.pe_dim * st.pool_dim + e * (2 * 2 * tokens * st.pool_dim ** 2  # keys, values
            + 2 * 2 * tokens * st.pool_dim) + 2 * e * lens.pe * st.pool_dim * d)  # pooling, projection
  freq_dim = d if cfg.v2 else 256
  flow = (e * (2 * n * 7 * cfg.latent_dim * d + 3 * 2 * n * 7 * d * h)  # audio input projection
          + 2 * (freq_dim * d + d * d) + 3 * 2 * d * h)  # t_embed, global_cond_mlp
  attn = lambda lq, lk: 4 * lq * lk * d  # q k^T and weights @ v
  for i in range(cfg.num_joint_blocks):
    pre_only = i == cfg.num_joint_blocks - 1
    flow += e * _stream(n, n, d, h, 3, False)
    streams = _stream(lc, 1, d, h, 3, pre_only) + _stream(lt, 1, d, h, 1, pre_only)
    if cfg.joint_mode == 'concat' or e == 1:
      flow += streams + attn(e * n + lc + lt, e * n + lc + lt)
    else:
      flow += e * (streams + attn(n + lc + lt, n + lc + lt))
  flow += cfg.fused_depth * e * (_stream(n, n, d, h, 3, False) + attn(n, n))
  flow += e * (2 * d * 2 * d + 2 * n * 7 * d * cfg.latent_dim)  # final layer
  return {'preprocess_conditions': batch * pre, 'predict_flow': batch * flow}


def sample_flops(cfg: NetworkConfig, num_steps: int = 25, cfg_guidance: bool = True, heun: bool = False,
                 batch: int = 1) -> int:
  """One full sampling call: conditions once (plus the null ones), then every network evaluation."""
  f = network_flops(cfg, batch)
  evals = num_steps * (2 if heun else 1) * (2 if cfg_guidance else 1)
  return f['preprocess_conditions'] * (2 if cfg_guidance else 1) + evals * f['predict_flow']
