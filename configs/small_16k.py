"""MMAudio S-16k (157,283,644 params mono), binaural ViSAudio by default.

Run:  python sample.py --config=configs/small_16k.py
Arg:  comma-separated flags, e.g. --config=configs/small_16k.py:mono,scan,remat,bf16
      (mono = MMAudio itself; scan/remat/bf16 = memory and speed; sequential/shared = ViSAudio variants).
Override any field: --config.model.duration_s=10 --config.flow.num_steps=50
"""
from visaudio_jax.model import presets


def get_config(arg=None):
  return presets.experiment_config('small_16k', arg)
