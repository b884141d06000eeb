"""(video, binaural wav, caption) manifest -> TFRecord shards of training / evaluation examples.

  python data_prep/extract_features.py --config=configs/tiny.py \\
      --manifest=out/biaudio_mini/train/manifest.jsonl --out_dir=out/shards/train --split=train

The config's `encoders` and `codec` blocks choose the models (the tiny config runs seeded tiny
encoders and the mel codec, no weights needed; MMAudio configs need the official checkpoints, e.g.
`--config.encoders.clip_ckpt=... --config.codec.vae_ckpt=...`). Clips are probed first and
unusable ones (no video stream, mono audio, too short, unreadable) are skipped and listed in
`<out_dir>/<split>.skipped.json`. Interrupt and rerun at will: finished shards are kept (verified)
and only the missing ones are computed. Evaluation splits (`--with_audio`, default for every split
but 'train') also store the binaural waveform; manifests with metadata (BiAudio-mini) store the true
source azimuth and camera yaw per CLIP frame.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from visaudio_jax.data import extraction

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Experiment config (model, encoders, codec).')
_MANIFEST = flags.DEFINE_string('manifest', None, 'JSON-lines manifest of video/wav/caption[/metadata].', required=True)
_OUT = flags.DEFINE_string('out_dir', None, 'Output folder for this split (one ShardSpec per folder).', required=True)
_SPLIT = flags.DEFINE_string('split', 'train', 'Split name (shard file prefix).')
_WITH_AUDIO = flags.DEFINE_bool('with_audio', None, 'Store the waveform (default: every split but train).')
_SHARD = flags.DEFINE_integer('examples_per_shard', 256, 'Examples per TFRecord shard.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Clips per encoder / codec call.')
_DTYPE = flags.DEFINE_enum('storage_dtype', 'float32', ['float32', 'float16', 'bfloat16'], 'Stored feature dtype.')


def main(argv):
  del argv
  summary = extraction.extract_split(_CONFIG.value, _MANIFEST.value, _OUT.value, _SPLIT.value,
                                     with_audio=_WITH_AUDIO.value, examples_per_shard=_SHARD.value,
                                     batch=_BATCH.value, storage_dtype=_DTYPE.value)
  logging.info('done')
  print(f"{summary['examples']} examples in {len(summary['shards'])} shards -> {_OUT.value} "
        f"({len(summary['skipped'])} skipped: {dict(summary['skipped_by_reason'])}) in {summary['seconds']} s")


if __name__ == '__main__':
  app.run(main)
