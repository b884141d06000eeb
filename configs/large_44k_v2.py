"""MMAudio L-44.1k v2 (1,030,575,608 params mono; SiLU projections, high-frequency time embedding), binaural ViSAudio by default.

Run:  python sample.py --config=configs/large_44k_v2.py
Arg:  comma-separated flags, e.g. --config=configs/large_44k_v2.py:mono,scan,remat,bf16
      (mono = MMAudio itself; scan/remat/bf16 = memory and speed; sequential/shared = ViSAudio variants).
Override any field: --config.model.duration_s=10 --config.flow.num_steps=50
"""
from visaudio_jax.model import presets


def get_config(arg=None):
  return presets.experiment_config('large_44k_v2', arg)
