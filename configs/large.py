"""The main training job: ViSAudio-L, MMAudio's L-44.1k network (1.72 B params binaural), MMAudio's recipe.

Run:  python train.py --config=configs/large.py --workdir=gs://bucket/visaudio-large \
          --config.data.dir=gs://bucket/shards --config.train.init_from=weights/mmaudio_large_44k.pth
      (shards from data_prep/extract_features.py with configs/large.py and the official encoders/VAE).
Layout: bf16 compute with fp32 params and optimizer; params, Adam moments and EMAs sharded over every
device (FSDP, mesh (1, -1, 1)); the batch (512 clips of 8 s) split over the same devices;
full rematerialisation of each block. Per-chip memory for TPU v5p pods:
      python -m visaudio_jax.tools.aot --config=configs/large.py --topology=v5p:4x4x4
Arg:  extra comma-separated flags, as for the other configs (e.g. :cudnn on GPUs).
Expect: MMAudio reports 300k iterations at batch 512 on 8 H100s for its L model (about a week).
"""
from configs import common


def get_config(arg=None):
  config = common.mmaudio_experiment('large_44k', ','.join(f for f in ('bf16,remat', arg) if f))
  config.mesh = common.mesh((1, -1, 1))  # FSDP over every device
  return config
