"""Feature extraction into shards, end to end on the embedded default: BiAudio-mini clips (written
here) plus deliberately bad clips -> `visaudio_jax.data.extraction.extract_split` with the tiny config's
seeded encoders and mel codec -> TFRecord shards -> the Grain loader."""
from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import soundfile

from configs import tiny
from visaudio_jax.audio import codec as codec_lib
from visaudio_jax.data import extraction, loader, synthetic


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """Four 2.0-2.4 s BiAudio-mini clips and three unusable ones in one manifest."""
  root = tmp_path_factory.mktemp('biaudio')
  cfg = dataclasses.replace(synthetic.SyntheticConfig(), duration_s=(2.0, 2.4))
  entries = synthetic.build_split(root, 'valid', 4, cfg, seed=3)
  split = root / 'valid'
  good = entries[0]
  mono = dict(good, id='mono', wav='mono.wav')
  wave, rate = soundfile.read(split / good['wav'])
  soundfile.write(split / 'mono.wav', wave[:, 0], rate)
  short = dict(good, id='short', wav='short.wav')
  soundfile.write(split / 'short.wav', wave[:rate], rate)
  no_video = dict(good, id='no_video', video=good['wav'])
  lines = [json.dumps(e) for e in entries[:2] + [mono, short, no_video] + entries[2:]]
  (split / 'all.jsonl').write_text('\n'.join(lines) + '\n')
  return split


def test_build_shards_skips_bad_clips_and_loads_back(dataset, tmp_path):
  config = tiny.get_config()
  out = tmp_path / 'shards'
  summary = extraction.extract_split(config, dataset / 'all.jsonl', out, 'valid', examples_per_shard=3, batch=2)
  assert summary['examples'] == 4 and len(summary['shards']) == 2
  assert summary['skipped'] == {'mono': 'mono audio (binaural needs 2 channels)',
                                'short': 'audio too short (1.00 s < 2.0 s)', 'no_video': 'no video stream'}
  assert json.loads((out / 'valid.skipped.json').read_text())['skipped_by_reason'] == {
      'mono audio': 1, 'audio too short': 1, 'no video stream': 1}
  ds = loader.make_dataset(out, 'valid', None, global_batch=4, seed=0, shuffle=False, num_epochs=1)
  batch = next(iter(ds))
  assert list(batch['id']) == ['valid_000000', 'valid_000001', 'valid_000002', 'valid_000003']
  assert batch['latent_mean'].shape == (4, 2, 125, 32) and batch['pe_f'].shape == (4, 8, 4, 4, 32)
  assert batch['audio'].shape == (4, 2, 32000) and batch['source_azimuth_deg'].shape == (4, 16)
  # The stored latents are the codec's encoding of the stored audio (tiny mel codec, both ears).
  codec_cfg = codec_lib.codec_config('tiny_mel')
  again = codec_lib.encode_binaural(codec_cfg, {}, jnp.asarray(batch['audio']))
  np.testing.assert_allclose(batch['latent_mean'], again.mean, atol=1e-5)
  # BiAudio-mini's azimuth (first source, +90 = left) agrees in sign with the level difference
  # whenever the source is lateral and alone (here: valid_000001, on the right at -20..-28 deg).
  meta = [json.loads((dataset / f'{i}.json').read_text()) for i in batch['id']]
  checked = 0
  for k, m in enumerate(meta):
    az = batch['source_azimuth_deg'][k]
    if len(m['sources']) == 1 and 'Invisible sound: none' in m['caption'] and abs(az).min() > 15 \
        and np.sign(az).min() == np.sign(az).max():
      left, right = (np.sqrt(np.mean(batch['audio'][k, e] ** 2)) for e in (0, 1))
      assert np.sign(az[0]) == np.sign(left - right)
      checked += 1
  assert checked >= 1


def test_rerun_recomputes_nothing_and_changes_nothing(dataset, tmp_path, monkeypatch):
  config = tiny.get_config()
  out = tmp_path / 'shards'
  extraction.extract_split(config, dataset / 'manifest.jsonl', out, 'train', examples_per_shard=2, batch=2)
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  (out / 'train-00001-of-00002.tfrecord').unlink()  # as if killed while writing the last shard
  calls = []
  real = extraction.Extractor.__call__
  monkeypatch.setattr(extraction.Extractor, '__call__', lambda self, clips, spec: calls.append(
      [c.id for c in clips]) or real(self, clips, spec))
  extraction.extract_split(config, dataset / 'manifest.jsonl', out, 'train', examples_per_shard=2, batch=2)
  assert calls == [['valid_000002', 'valid_000003']]
  after = {p.name: p.read_bytes() for p in out.iterdir()}
  assert {k: v for k, v in after.items() if not k.endswith('skipped.json')} == \
      {k: v for k, v in before.items() if not k.endswith('skipped.json')}
  assert json.loads((out / 'spec.json').read_text())['audio'] is None  # train splits store no waveform
