"""Evaluate generated binaural audio against references: metrics.json, report.md and plots.

  python evaluate.py --generated=out/sample --reference=data/test_wavs --out=out/eval
  python evaluate.py --generated=out/sample --reference=out/shards_eval --split=test --out=out/eval
  python evaluate.py --generated=G --reference=R --out=O --embedders=mel_stats --batch_size=16 --plot_clips=5

Generated files (WAV/FLAC) are matched to reference clips by file stem = clip id. The reference is a
folder of WAVs or a shard directory whose split stores audio (BiAudio-mini's also stores the true
source azimuth, which adds direction accuracy). Mismatched sets are reported, not fatal.
"""
from absl import app, flags

from visaudio_jax.eval.evaluate import evaluate

_GENERATED = flags.DEFINE_string('generated', None, 'Folder of generated stereo WAV/FLAC files, one per clip id.',
                                 required=True)
_REFERENCE = flags.DEFINE_string('reference', None, 'Folder of reference WAVs, or a shard directory with audio.',
                                 required=True)
_SPLIT = flags.DEFINE_string('split', None, 'Split of a shard-directory reference (default: test).')
_OUT = flags.DEFINE_string('out', 'out/eval', 'Where metrics.json, report.md and plots/ go.')
_EMBEDDERS = flags.DEFINE_list('embedders', ['mel_stats'], 'Embedding networks for the quality metrics.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Clips per evaluation batch (memory vs speed).')
_PLOTS = flags.DEFINE_bool('plots', True, 'Draw PNG plots (--noplots: metrics and report only).')
_PLOT_CLIPS = flags.DEFINE_integer('plot_clips', 3, 'Clips to draw spectrograms and cue tracks for.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random-pairing baseline.')

SUMMARY = ('ild_mae', 'ild_high_mae', 'itd_mae', 'itd_coverage', 'iacc_mae', 'balance_corr', 'smr_error', 'bias_skill',
           'ild_w1', 'itd_w1', 'spatial_fd', 'direction_ild', 'direction_itd', 'side_agreement', 'side_clips')


def main(argv):
  del argv
  metrics = evaluate(_GENERATED.value, _REFERENCE.value, _OUT.value, reference_split=_SPLIT.value,
                     embedders=_EMBEDDERS.value, batch_size=_BATCH.value, seed=_SEED.value, plots=_PLOTS.value,
                     plot_clips=_PLOT_CLIPS.value)
  names = [n for n in SUMMARY if n in metrics['metrics']]
  names += [n for n in metrics['metrics'] if n.startswith(('fd_', 'kl_')) and not n.endswith(('_left', '_right'))]
  systems = metrics['systems']
  width = max(map(len, names))
  print(f'{metrics["num_clips"]} clips of {metrics["clip_seconds"]:.2f} s')
  print(f'{"metric":<{width}}  ' + '  '.join(f'{s:>10}' for s in systems))
  for name in names:
    cells = (metrics['metrics'][name][s] for s in systems)
    print(f'{name:<{width}}  ' + '  '.join(f'{"-" if v is None else format(v, ".4g"):>10}' for v in cells))
  for kind, items in metrics['mismatches'].items():
    print(f'mismatch {kind}: {len(items["ids"]) if isinstance(items, dict) else len(items)}')
  print(f'wrote {_OUT.value}/metrics.json, report.md and {len(metrics["plots"])} plots')


if __name__ == '__main__':
  app.run(main)
