"""MMAudio L-44.1k (1,030,002,168 params mono), binaural ViSAudio by default.

Run:  python sample.py --config=configs/large_44k.py
Arg:  comma-separated flags, e.g. --config=configs/large_44k.py:mono,scan,remat,bf16
      (mono = MMAudio itself; scan/remat/bf16 = memory and speed; sequential/shared = ViSAudio variants).
Train: python train.py --config=configs/large_44k.py --workdir=DIR --config.data.dir=SHARDS \
          --config.train.init_from=weights/<mmaudio checkpoint>.pth   (MMAudio's recipe, configs/common.py)
Override any field: --config.model.duration_s=10 --config.flow.num_steps=50
"""
from configs import common


def get_config(arg=None):
  return common.mmaudio_experiment('large_44k', arg)
