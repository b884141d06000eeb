"""Turn videos into binaural videos with a trained model (visaudio_jax/sample).

  python sample.py --checkpoint=runs/tiny --manifest=data/biaudio_mini/demo/clips/test/manifest.jsonl --out=out/demo
  python sample.py --checkpoint=runs/large/checkpoints/300000 --video='clips/*.mp4' \
      --captions=captions.csv --out=out/large --params=raw --steps=50 --cfg=4.5 --batch=16
  python sample.py --checkpoint=weights/mmaudio_large_44k_v2.pth --config=configs/large_44k_v2.py \
      --manifest=todo.csv --out=out/mmaudio --config.codec.vae_ckpt=... --config.encoders.clip_ckpt=...
  python sample.py --config=configs/small_16k.py --random_features --out=out/bench  # stand-in features

A run directory brings its own config (the one its checkpoint was saved with); `--config.x=y`
overrides any field of it. An MMAudio checkpoint file, or no checkpoint (fresh seeded weights),
needs `--config=configs/<name>.py`. Writes <out>/<id>.wav, <out>/<id>.mp4 and <out>/summary.json;
existing outputs are skipped unless --overwrite. Exit status 1 when any clip failed.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from visaudio_jax import components
from visaudio_jax.sample import command, inputs
from visaudio_jax.sample.pipeline import Pipeline


def _checkpoint_arg(argv: list[str]) -> str | None:
  """--checkpoint's value, read before flag parsing: a run directory supplies the config flag's value."""
  for i, arg in enumerate(argv):
    if arg.startswith('--checkpoint='):
      return arg.split('=', 1)[1]
    if arg == '--checkpoint' and i + 1 < len(argv):
      return argv[i + 1]
  return None


_RUN = _checkpoint_arg(sys.argv)
if _RUN and os.path.isdir(_RUN):
  _CONFIG = config_flags.DEFINE_config_dict('config', components.run_config(_RUN), 'The run\'s stored config.',
                                            lock_config=True)
else:
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (needed without a run directory).',
                                            lock_config=True)
_CKPT = flags.DEFINE_string('checkpoint', None, 'A train.py workdir (latest step), RUN/checkpoints/<step>, or an '
                            'MMAudio .pth/.safetensors; none: fresh seeded weights (benchmarks).')
_VIDEOS = flags.DEFINE_multi_string('video', [], 'Video files, folders or globs (repeat the flag); id = file stem.')
_MANIFEST = flags.DEFINE_string('manifest', None, 'CSV id,video[,caption] or a dataset manifest .jsonl, instead of --video.')
_CAPTIONS_CSV = flags.DEFINE_string('captions', None, 'CSV id,caption for the --video clips.')
_CAPTIONS = flags.DEFINE_multi_string('caption', [], 'One caption for all videos, or one per video in order.')
_OUT = flags.DEFINE_string('out', 'out/sample', 'Output folder.')
_PARAMS = flags.DEFINE_enum('params', 'ema', ['ema', 'raw'], 'A run\'s EMA (config.sample.ema) or its raw params.')
_STEPS = flags.DEFINE_integer('steps', None, 'ODE steps (default config.flow.num_steps).')
_CFG = flags.DEFINE_float('cfg', None, 'Classifier-free guidance strength (default config.flow.cfg_strength).')
_SOLVER = flags.DEFINE_enum('solver', None, ['euler', 'heun'], 'ODE solver (default config.flow.method).')
_SEED = flags.DEFINE_integer('seed', 0, 'Noise seed; each clip draws from (seed, its id, window).')
_BATCH = flags.DEFINE_integer('batch', None, 'Clips per batch over all local devices (default config.sample.batch_size).')
_NEGATIVE = flags.DEFINE_string('negative', None, 'Negative prompt (default config.sample.negative_prompt).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Redo clips whose outputs exist.')
_RANDOM = flags.DEFINE_bool('random_features', False, 'Seeded stand-in features instead of the encoders (benchmarks); '
                            'without videos, config.sample.batch_size clips of the model\'s duration, WAVs only.')


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config=configs/<name>.py is needed unless --checkpoint is a run directory')
  with config.unlocked():
    for block, key, value in (('flow', 'num_steps', _STEPS.value), ('flow', 'cfg_strength', _CFG.value),
                              ('flow', 'method', _SOLVER.value), ('sample', 'negative_prompt', _NEGATIVE.value)):
      if value is not None:
        config[block][key] = value
  pipe = Pipeline.from_checkpoint(_CKPT.value, config, _PARAMS.value)
  if _RANDOM.value and not (_VIDEOS.value or _MANIFEST.value):
    items = command.stand_in_items(pipe.options.batch_size)
  else:
    items = inputs.gather(_VIDEOS.value, _MANIFEST.value, _CAPTIONS_CSV.value, _CAPTIONS.value)
  summary = command.run(pipe, items, _OUT.value, seed=_SEED.value, batch=_BATCH.value, overwrite=_OVERWRITE.value,
                        random_features=_RANDOM.value)
  print(f"{summary['generated']} generated, {summary['skipped']} skipped, {summary['failed']} failed "
        f"in {summary['wall_s']:.1f} s ({pipe.weights.source}, {pipe.weights.params}) -> {_OUT.value}")
  for clip in summary['clips']:
    if clip.get('status') == 'failed':
      print(f"  failed {clip['id']}: {clip['error']}")
  return 1 if summary['failed'] else 0


if __name__ == '__main__':
  app.run(main)
