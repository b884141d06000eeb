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

import collections
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from visaudio_jax.data import extraction, shards  # noqa: E402
from visaudio_jax.data.schema import ShardSpec  # noqa: E402
from visaudio_jax.data.tfrecord import write_atomic  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Experiment config (model, encoders, codec).')
_MANIFEST = flags.DEFINE_string('manifest', None, 'JSON-lines manifest of video/wav/caption[/metadata].', required=True)
_OUT = flags.DEFINE_string('out_dir', None, 'Output folder for this split (one ShardSpec per folder).', required=True)
_SPLIT = flags.DEFINE_string('split', 'train', 'Split name (shard file prefix).')
_WITH_AUDIO = flags.DEFINE_bool('with_audio', None, 'Store the waveform (default: every split but train).')
_SHARD = flags.DEFINE_integer('examples_per_shard', 256, 'Examples per TFRecord shard.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Clips per encoder / codec call.')
_DTYPE = flags.DEFINE_enum('storage_dtype', 'float32', ['float32', 'float16', 'bfloat16'], 'Stored feature dtype.')


def build(config, manifest: str, out_dir: str, split: str, *, with_audio: bool | None = None,
          examples_per_shard: int = 256, batch: int = 8, storage_dtype: str = 'float32') -> dict:
  """Probe, extract and shard one split; returns a summary (also written next to the shards)."""
  start = time.perf_counter()
  extractor = extraction.Extractor(config)
  clips = extraction.read_manifest(manifest)
  usable, skipped = extraction.usable_clips(clips, extractor.net.duration_s)
  if not usable:
    raise ValueError(f'{manifest}: no usable clips ({len(skipped)} skipped: {collections.Counter(skipped.values())})')
  with_metadata = all(c.metadata for c in usable)
  spec = ShardSpec.from_network(extractor.net, with_audio=split != 'train' if with_audio is None else with_audio,
                                with_metadata=with_metadata, camera_yaw=with_metadata, storage_dtype=storage_dtype)
  cache: dict[int, dict] = {}
  progress = tqdm(total=len(usable), desc=f'extract {split}', unit='clip')

  def example(i: int) -> dict:
    if i not in cache:  # compute the whole batch holding i (write_split asks in index order)
      cache.clear()
      first = i - i % batch
      for j, ex in enumerate(extractor(usable[first:first + batch], spec), first):
        cache[j] = ex
      progress.update(len(cache))
    return cache[i]

  paths = shards.write_split(out_dir, split, spec, example, len(usable), examples_per_shard)
  progress.close()
  summary = {'split': split, 'manifest': str(manifest), 'clips': len(clips), 'examples': len(usable),
             'shards': [p.name for p in paths], 'skipped': skipped,
             'skipped_by_reason': collections.Counter(r.split(' (')[0] for r in skipped.values()),
             'spec': json.loads(spec.to_json()), 'seconds': round(time.perf_counter() - start, 1)}
  write_atomic(pathlib.Path(out_dir) / f'{split}.skipped.json', json.dumps(summary, indent=1).encode())
  return summary


def main(argv):
  del argv
  summary = build(_CONFIG.value, _MANIFEST.value, _OUT.value, _SPLIT.value, with_audio=_WITH_AUDIO.value,
                  examples_per_shard=_SHARD.value, batch=_BATCH.value, storage_dtype=_DTYPE.value)
  logging.info('done')
  print(f"{summary['examples']} examples in {len(summary['shards'])} shards -> {_OUT.value} "
        f"({len(summary['skipped'])} skipped: {dict(summary['skipped_by_reason'])}) in {summary['seconds']} s")


if __name__ == '__main__':
  app.run(main)
