"""Sample binaural audio with the jitted flow-matching sampler: latents, then stereo WAVs.

  python sample.py --config=configs/tiny.py --output_dir=out/sample
  python sample.py --config=configs/tiny.py --video=a.mp4,b.mp4 --caption="a dog barks" --caption=""
  python sample.py --config=configs/large_44k_v2.py --mmaudio_ckpt=weights/mmaudio_large_44k_v2.pth \
      --config.codec.vae_ckpt=weights/v1-44.pth --config.codec.vocoder_ckpt=weights/bigvgan_v2_44k.pt
"""
from absl import app, flags
from ml_collections import config_flags

from visaudio_jax.sample import command

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Config file (ml_collections).',
                                          lock_config=True)
_OUTPUT = flags.DEFINE_string('output_dir', 'out/sample', 'Where sample_<i>.wav, latents.safetensors and summary.json go.')
_VIDEOS = flags.DEFINE_list('video', [], 'Videos to condition on (default: seeded stand-in features).')
_CAPTIONS = flags.DEFINE_multi_string('caption', [], 'One caption per video (default: none).')
_CKPT = flags.DEFINE_string('mmaudio_ckpt', None, 'MMAudio .pth/.safetensors to start from (made binaural).')


def main(argv):
  del argv
  summary = command.run(_CONFIG.value, _OUTPUT.value, _CKPT.value, _VIDEOS.value, _CAPTIONS.value)
  width = max(map(len, summary))
  for key, value in summary.items():
    print(f'{key:<{width}}  {value}')


if __name__ == '__main__':
  app.run(main)
