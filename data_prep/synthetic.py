"""Render BiAudio-mini (`visaudio_jax.data.synthetic`), optionally extracting it into feature shards.

  python -m data_prep.synthetic --out=data/biaudio_mini --num_train=256 --num_valid=32 --num_test=32
  python -m data_prep.synthetic --out=data/biaudio_mini --sofa=/usr/share/libmysofa/default.sofa
  python data_prep/synthetic.py --out=out/biaudio_mini --num_clips=300 --shards=out/shards --config=configs/tiny.py

Run from the repository root (the default --config is relative to it; the script form needs the
package installed, `pip install -e .`). Each split goes to <out>/<split>/ as <id>.mp4, <id>.wav,
<id>.json and manifest.jsonl; with --shards, its extracted TFRecord shards to <shards>/<split>/.
"""
from absl import app, flags
from ml_collections import config_flags

from visaudio_jax.data import binaural, synthetic

_DEFAULT = synthetic.SyntheticConfig()
_OUT = flags.DEFINE_string('out', None, 'Output folder; one subfolder per split.', required=True)
_SEED = flags.DEFINE_integer('seed', 0, 'Clips are a pure function of (seed, split, index).')
_NUM_TRAIN = flags.DEFINE_integer('num_train', 256, 'Clips in the train split.')
_NUM_VALID = flags.DEFINE_integer('num_valid', 32, 'Clips in the valid split.')
_NUM_TEST = flags.DEFINE_integer('num_test', 32, 'Clips in the test split.')
_NUM_CLIPS = flags.DEFINE_integer('num_clips', None, 'Total, split 80/10/10 (overrides --num_*).')
_MIN_DURATION = flags.DEFINE_float('min_duration', _DEFAULT.duration_s[0], 'Shortest clip, seconds.')
_MAX_DURATION = flags.DEFINE_float('max_duration', _DEFAULT.duration_s[1], 'Longest clip, seconds.')
_SAMPLE_RATE = flags.DEFINE_integer('sample_rate', _DEFAULT.sample_rate, 'Audio sample rate, Hz.')
_FPS = flags.DEFINE_integer('fps', _DEFAULT.fps, 'Video frame rate.')
_SIZE = flags.DEFINE_integer('size', _DEFAULT.size, 'Frames are size x size pixels.')
_SOFA = flags.DEFINE_string('sofa', None, 'SimpleFreeFieldHRIR .sofa file (default: spherical head model), '
                            'e.g. /usr/share/libmysofa/default.sofa from Debian libmysofa1.')
_SHARDS = flags.DEFINE_string('shards', None, 'Also extract features into TFRecord shards here (<shards>/<split>/), '
                              'with the seeded encoders and codec of --config.')
_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Experiment config for --shards.')


def main(argv):
  del argv
  sizes = {'train': _NUM_TRAIN.value, 'valid': _NUM_VALID.value, 'test': _NUM_TEST.value}
  if _NUM_CLIPS.value is not None:
    sizes = synthetic.split_sizes(_NUM_CLIPS.value)
  config = synthetic.SyntheticConfig(duration_s=(_MIN_DURATION.value, _MAX_DURATION.value),
                                     sample_rate=_SAMPLE_RATE.value, fps=_FPS.value, size=_SIZE.value)
  hrtf = binaural.load_sofa(_SOFA.value).resampled(_SAMPLE_RATE.value) if _SOFA.value else None  # resample once
  synthetic.build(_OUT.value, sizes, config, _SEED.value, hrtf, _SHARDS.value, _CONFIG.value)


if __name__ == '__main__':
  app.run(main)
