"""Tiny binaural net (3.1 M params; 1.95 M mono) for CPU demos and tests; the identity-mel latent needs no pretrained codec.

Run:  python train.py --config=configs/tiny.py --workdir=runs/tiny   # the CPU demo (~14 min, 2 cores):
      renders BiAudio-mini, trains, and prints the share of clearly lateral held-out clips whose
      generated ILD points to the true side (100 % measured; untrained 47 % over 4 noise draws,
      mono duplicate 50 %).
      python sample.py --config=configs/tiny.py   # sample with the seeded (untrained) net, ~20 s
Arg:  comma-separated flags, e.g. --config=configs/tiny.py:mono,scan,remat,bf16
      (mono = MMAudio itself; scan/remat/bf16 = memory and speed; sequential/shared = ViSAudio variants).
Override any field: --config.model.duration_s=10 --config.flow.num_steps=50
"""
from visaudio_jax.model import presets


def get_config(arg=None):
  return presets.experiment_config('tiny', arg)
