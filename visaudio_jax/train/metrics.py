"""Training throughput and utilisation: analytic FLOPs per step, device peaks, MFU, memory.

MFU is model FLOPs (the network's matmuls, convolutions and attention, forward x 3 for training,
`model/flops.py`) per second over the devices' dense bf16 peak. A device kind missing from the table
gets no MFU rather than a guess.
"""
from __future__ import annotations

import resource

import jax
import numpy as np

from visaudio_jax.model.config import NetworkConfig
from visaudio_jax.model.flops import network_flops

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets, keyed by `device.device_kind`.
PEAK_BF16_FLOPS = {
    'NVIDIA H200': 989e12,
    'NVIDIA H100 80GB HBM3': 989e12,
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA A100-SXM4-40GB': 312e12,
    'NVIDIA B200': 2250e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e
    'TPU v5': 459e12,  # v5p
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,  # v6e (Trillium)
}


def train_flops_per_example(cfg: NetworkConfig) -> int:
  """One training example: condition preprocessing and one flow prediction, forward + backward (3x)."""
  f = network_flops(cfg, 1)
  return 3 * (f['preprocess_conditions'] + f['predict_flow'])


def peak_flops(device: jax.Device | None = None) -> float | None:
  device = device or jax.devices()[0]
  return PEAK_BF16_FLOPS.get(device.device_kind)


def throughput(cfg: NetworkConfig, global_batch: int, seconds_per_step: float, audio_seconds: float) -> dict:
  """examples/s, audio-seconds/s (both ears count once), TFLOP/s per device and MFU (if the peak is known)."""
  flops = train_flops_per_example(cfg) * global_batch / seconds_per_step
  out = {'examples_per_s': global_batch / seconds_per_step,
         'audio_seconds_per_s': global_batch * audio_seconds / seconds_per_step,
         'tflops_per_device': flops / jax.device_count() / 1e12}
  peak = peak_flops()
  if peak:
    out['mfu'] = flops / (peak * jax.device_count())
  return out


def memory() -> dict:
  """Device memory in use / peak (where the backend reports it) and this process's peak RSS, in GiB."""
  out = {'host_peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
  stats = jax.local_devices()[0].memory_stats() or {}
  for key in ('bytes_in_use', 'peak_bytes_in_use', 'bytes_limit'):
    if key in stats:
      out[f'device_{key.replace("bytes_", "")}_gib'] = stats[key] / 2**30
  return out


def summarize(history: list[dict]) -> dict[str, float]:
  """Mean of each step metric over a logging window; per-t-bucket losses from their sums and counts."""
  out = {}
  for key in history[0]:
    if key in ('t_bucket_loss_sum', 't_bucket_count'):
      continue
    out[key] = float(np.mean([h[key] for h in history]))
  if 't_bucket_loss_sum' in history[0]:
    sums = np.sum([h['t_bucket_loss_sum'] for h in history], axis=0)
    counts = np.sum([h['t_bucket_count'] for h in history], axis=0)
    n = len(sums)
    for i, (s, c) in enumerate(zip(sums, counts)):
      if c:
        out[f'loss_t{i / n:.2f}-{(i + 1) / n:.2f}'] = float(s / c)
  return out
