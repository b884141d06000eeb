"""TFRecord framing, the clip schema and resumable shard writing.

Parity with TensorFlow rests on fixtures written by TF 2.21's own `tf.io.TFRecordWriter`
(tests/fixtures/tfrecord/, see its README): `tf_written.tfrecord` (5 `tf.train.Example`s),
`expected.json` (decoded values, payload SHA-256, frame offsets and lengths), `truncated.tfrecord`
(tf.data: 'truncated record at 973') and `corrupt_payload.tfrecord` ('corrupted record at 477').
"""
import dataclasses
import hashlib
import json
import logging
import pickle
import shutil

import ml_dtypes
import numpy as np
import pytest
from conftest import fixture_path
from tensorflow_datasets.proto import tf_example_pb2

from visaudio_jax import files
from visaudio_jax.data import schema, shards, tfrecord
from visaudio_jax.model.config import network_config
from visaudio_jax.model.network import feature_shapes
from configs import tiny

SMALL = schema.ShardSpec(clip_f=(4, 8), sync_f=(8, 6), text_f=(3, 8), latent=(2, 5, 4))


def make_example(spec: schema.ShardSpec, i: int) -> dict:
  """A deterministic random example of `spec` (example i)."""
  rng = np.random.default_rng(i)
  example = {'id': f'clip_{i:04d}', 'caption': f'clip {i} ♪' if i % 3 else '', 'duration_s': 2.0,
             'sample_rate': 16000}
  for name, feat in schema.features(spec).items():
    if name not in example:
      example[name] = rng.standard_normal(feat.shape).astype(np.float32)
  return {k: v for k, v in example.items() if k in schema.features(spec).keys()}


def tree_bytes(directory) -> dict:
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --- TFRecord framing against TensorFlow's files -------------------------------------------------

@pytest.fixture(scope='module')
def expected():
  return json.loads(fixture_path('tfrecord', 'expected.json').read_text())


def test_reads_tf_written_records(expected):
  payloads = list(tfrecord.read_records(fixture_path('tfrecord', 'tf_written.tfrecord')))
  assert len(payloads) == len(expected['records']) == 5
  for payload, want in zip(payloads, expected['records']):
    assert hashlib.sha256(payload).hexdigest() == want['payload_sha256']
    feature = tf_example_pb2.Example.FromString(payload).features.feature
    assert feature['id'].bytes_list.value[0].decode() == want['id']
    assert feature['caption'].bytes_list.value[0].decode('utf-8') == want['caption']
    assert list(feature['latent_shape'].int64_list.value) == want['latent_shape'] == [6, 4]
    assert feature['label'].int64_list.value[0] == want['label']
    mean = np.array(feature['latent_mean_l'].float_list.value, np.float32).reshape(want['latent_shape'])
    np.testing.assert_array_equal(mean, np.array(want['latent_mean_l'], np.float32))


def test_writer_reproduces_tf_file_byte_for_byte(expected, tmp_path):
  source = fixture_path('tfrecord', 'tf_written.tfrecord')
  payloads = list(tfrecord.read_records(source))
  path = tmp_path / 'copy.tfrecord'
  with tfrecord.TFRecordWriter(path) as writer:
    offsets = [writer.write(p) for p in payloads]
  assert path.read_bytes() == source.read_bytes()
  assert path.stat().st_size == expected['file_size'] == 1498
  assert offsets == [f['offset'] for f in expected['framing']]
  index = tfrecord.load_index(path, verify=True)
  assert index == tfrecord.build_index(source, write=False)
  assert index.offsets.tolist() == offsets
  assert index.lengths.tolist() == [f['payload_len'] for f in expected['framing']]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['copy.tfrecord', 'copy.tfrecord.index']


@pytest.mark.parametrize('name, kind, offset', [('truncated', 'truncated', 973), ('corrupt_payload', 'corrupted', 477)])
def test_damaged_tf_files_raise_with_tf_offsets(name, kind, offset, expected, caplog):
  path = fixture_path('tfrecord', f'{name}.tfrecord')
  records = tfrecord.read_records(path)
  with pytest.raises(tfrecord.CorruptRecordError, match=f'{name}.tfrecord: {kind} record at {offset} ') as err:
    for _ in records:
      pass
  assert (err.value.kind, err.value.offset) == (kind, offset)
  assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)  # as sent from a Grain worker
  with pytest.raises(tfrecord.CorruptRecordError, match=f'{kind} record at {offset} '):
    tfrecord.build_index(path, write=False)
  # skip mode: tf.data yields the first 4 records of the truncated file; the corrupt one is skipped.
  with caplog.at_level(logging.WARNING):
    records = tfrecord.read_records(path, skip_corrupt=True)
    good = [hashlib.sha256(p).hexdigest() for p in records]
  bad = 4 if name == 'truncated' else 2
  assert good == [r['payload_sha256'] for i, r in enumerate(expected['records']) if i != bad]
  assert records.num_corrupt == 1
  assert f'{kind} record at {offset}' in caplog.text


def test_reader_through_index_checks_crc(tmp_path, caplog):
  """The index of the intact file served over the corrupt one (same size): record 2 fails its CRC."""
  shard = tmp_path / 'corrupt.tfrecord'
  shutil.copy(fixture_path('tfrecord', 'corrupt_payload.tfrecord'), shard)
  index = tfrecord.build_index(fixture_path('tfrecord', 'tf_written.tfrecord'), write=False)
  tfrecord.index_path(shard).write_bytes(index.to_bytes())
  reader = tfrecord.ShardReader(shard)
  assert reader[1] == list(tfrecord.read_records(fixture_path('tfrecord', 'tf_written.tfrecord')))[1]
  with pytest.raises(tfrecord.CorruptRecordError, match='corrupted record at 477'):
    reader[2]
  lenient = tfrecord.ShardReader(shard, skip_corrupt=True)
  with caplog.at_level(logging.WARNING):
    assert lenient[2] is None and lenient[3] is not None
  assert lenient.num_corrupt == 1 and 'corrupted record at 477' in caplog.text


# --- index --------------------------------------------------------------------------------------

def write_shard(path, payloads):
  with tfrecord.TFRecordWriter(path) as writer:
    for p in payloads:
      writer.write(p)


def test_random_access_equals_sequential_and_pickles(tmp_path):
  payloads = [bytes([i]) * (i * 37 % 101) for i in range(9)]  # includes an empty record
  path = tmp_path / 's.tfrecord'
  write_shard(path, payloads)
  assert list(tfrecord.read_records(path)) == payloads
  reader = tfrecord.ShardReader(path)
  assert len(reader) == 9
  order = np.random.default_rng(0).permutation(9)
  assert [reader[int(i)] for i in order] == [payloads[i] for i in order]
  assert reader[-1] == payloads[-1]
  with pytest.raises(IndexError):
    reader[9]
  clone = pickle.loads(pickle.dumps(reader))
  assert [clone[i] for i in range(9)] == payloads


def test_stale_or_missing_index_is_reported_or_rebuilt(tmp_path):
  path = tmp_path / 's.tfrecord'
  write_shard(path, [b'abc', b'defg'])
  good = tfrecord.index_path(path).read_bytes()
  # Missing: reported, or rebuilt (and written) on request.
  tfrecord.index_path(path).unlink()
  with pytest.raises(tfrecord.StaleIndexError, match='missing; rebuild it with build_index'):
    len(tfrecord.ShardReader(path))
  assert tfrecord.ShardReader(path, rebuild_index=True)[1] == b'defg'
  assert tfrecord.index_path(path).read_bytes() == good
  # Damaged index file.
  tfrecord.index_path(path).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
  with pytest.raises(tfrecord.StaleIndexError, match='checksum mismatch'):
    tfrecord.load_index(path)
  # Shard rewritten with other contents of the same size: only the full check sees it.
  old_index = good
  write_shard(path, [b'xyz', b'uvwt'])
  tfrecord.index_path(path).write_bytes(old_index)
  tfrecord.load_index(path)
  with pytest.raises(tfrecord.StaleIndexError, match='payload checksums differ'):
    tfrecord.load_index(path, verify=True)
  # Shard of another size.
  write_shard(path, [b'abc'])
  tfrecord.index_path(path).write_bytes(old_index)
  with pytest.raises(tfrecord.StaleIndexError, match='indexes a shard of 39 bytes'):
    tfrecord.load_index(path)
  # A reader over a stale index with misplaced frames refuses to serve a wrong record.
  write_shard(path, [b'abcd', b'efg'])
  tfrecord.index_path(path).write_bytes(old_index)
  with pytest.raises(tfrecord.CorruptRecordError, match='at 19'):
    tfrecord.ShardReader(path)[1]


def test_writer_is_atomic(tmp_path):
  path = tmp_path / 's.tfrecord'
  with pytest.raises(RuntimeError, match='boom'):
    with tfrecord.TFRecordWriter(path) as writer:
      writer.write(b'first')
      raise RuntimeError('boom')
  assert list(tmp_path.iterdir()) == []


# --- schema ---------------------------------------------------------------------------------------

TINY = network_config(tiny.get_config().model)
FULL = schema.ShardSpec.from_network(TINY, with_audio=True, with_metadata=True, camera_yaw=True)
# Round-to-nearest relative error bounds: 2^-11 (float16, 10 mantissa bits), 2^-8 (bfloat16, 7).
TOLERANCE = {'float32': 0.0, 'float16': 2.0**-11, 'bfloat16': 2.0**-8}


def spec_itemsize(spec: schema.ShardSpec) -> int:
  return schema.STORAGE_DTYPES[spec.storage_dtype].itemsize


def test_spec_from_network_and_json(tmp_path):
  shapes = feature_shapes(TINY)
  assert (FULL.clip_f, FULL.sync_f, FULL.text_f, FULL.pe_f) == (
      shapes['clip_f'], shapes['sync_f'], shapes['text_f'], shapes['pe_f'])
  assert FULL.latent == shapes['latent'] == (2, 125, 32)
  assert FULL.audio == (2, TINY.seq_lens().audio_samples) and FULL.metadata_frames == TINY.seq_lens().clip
  assert schema.ShardSpec.from_network(TINY, with_pe=False).pe_f is None
  schema.write_spec(tmp_path, FULL)
  assert schema.read_spec(tmp_path) == FULL
  with pytest.raises(FileNotFoundError, match='no ShardSpec'):
    schema.read_spec(tmp_path / 'elsewhere')
  with pytest.raises(ValueError, match='storage_dtype must be one of'):
    schema.ShardSpec((1, 1), (1, 1), (1, 1), (1, 1, 1), storage_dtype='int8')


@pytest.mark.parametrize('storage_dtype', sorted(TOLERANCE))
def test_round_trip_every_field(storage_dtype):
  spec = dataclasses.replace(FULL, storage_dtype=storage_dtype)
  example = make_example(spec, 1)
  data = schema.encode_example(spec, example)
  assert data == schema.encode_example(spec, make_example(spec, 1))  # deterministic bytes
  out = schema.decode_example(spec, data)
  assert set(out) == set(example) == {
      'id', 'caption', 'duration_s', 'clip_f', 'sync_f', 'text_f', 'latent_mean', 'latent_std', 'pe_f',
      'audio', 'sample_rate', 'source_azimuth_deg', 'camera_yaw_deg'}
  assert (out['id'], out['caption']) == (example['id'], example['caption'])
  assert out['sample_rate'].dtype == np.int32 and out['sample_rate'] == 16000
  stored = {'clip_f', 'sync_f', 'text_f', 'latent_mean', 'latent_std', 'pe_f'}
  for name in set(example) - {'id', 'caption', 'sample_rate'}:
    assert out[name].dtype == np.float32 and out[name].shape == np.shape(example[name]), name
    rtol = TOLERANCE[storage_dtype] if name in stored else 0.0
    np.testing.assert_allclose(out[name], example[name], rtol=rtol, atol=1e-7 if rtol else 0, err_msg=name)
  # Half precision takes 2 bytes per value (raw bytes, not widened to a float_list).
  saved = len(schema.encode_example(FULL, example)) - len(data)
  assert saved == pytest.approx(sum(example[k].size for k in stored) * (4 - spec_itemsize(spec)), abs=64)
  # bfloat16 storage is exact for values that are bfloat16 already.
  if storage_dtype == 'bfloat16':
    exact = dict(example, clip_f=example['clip_f'].astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(schema.decode_example(spec, schema.encode_example(spec, exact))['clip_f'],
                                  exact['clip_f'].astype(np.float32))


def test_bad_examples_name_the_field():
  good = make_example(SMALL, 0)
  with pytest.raises(ValueError, match=r"clip_f of example 'clip_0000': expected shape \(4, 8\) "
                                       r'\(T_clip, D_clip\) CLIP image features, got \(4, 7\)'):
    schema.encode_example(SMALL, dict(good, clip_f=np.zeros((4, 7))))
  with pytest.raises(ValueError, match=r"missing fields \['text_f'\], unexpected fields \['pe_f'\]"):
    schema.encode_example(SMALL, {**{k: v for k, v in good.items() if k != 'text_f'}, 'pe_f': 0})
  with pytest.raises(ValueError, match='sync_f .*: non-finite values'):
    schema.encode_example(SMALL, dict(good, sync_f=np.full((8, 6), np.nan)))
  half = dataclasses.replace(SMALL, storage_dtype='float16')
  with pytest.raises(ValueError, match='latent_std .*: values beyond the range of float16 storage'):
    schema.encode_example(half, dict(good, latent_std=np.full((2, 5, 4), 1e5)))
  with pytest.raises(ValueError, match='caption: expected a str'):
    schema.encode_example(SMALL, dict(good, caption=None))
  data = schema.encode_example(SMALL, good)
  with pytest.raises(ValueError, match=r"lacks fields \['pe_f'\] of the ShardSpec"):
    schema.decode_example(dataclasses.replace(SMALL, pe_f=(1, 2, 2, 3)), data)
  with pytest.raises(ValueError, match=r'clip_f .*does not fit shape \(4, 8\) float16'):
    schema.decode_example(half, data)
  with pytest.raises(ValueError, match='not a serialized tf.train.Example'):
    schema.decode_example(SMALL, b'\xff\xff\xff')


# --- writing splits -----------------------------------------------------------------------------

def test_write_split_layout_and_streaming_writer_agree(tmp_path):
  paths = shards.write_split(tmp_path / 'a', 'train', SMALL, lambda i: make_example(SMALL, i), 7, 3)
  assert [p.name for p in paths] == [f'train-0000{k}-of-00003.tfrecord' for k in range(3)]
  manifest = shards.read_manifest(tmp_path / 'a', 'train')
  assert [s['num_examples'] for s in manifest['shards']] == [3, 3, 1] and manifest['num_examples'] == 7
  assert shards.shard_paths(tmp_path / 'a', 'train') == paths
  decoded = [schema.decode_example(SMALL, r) for p in paths for r in tfrecord.read_records(p)]
  assert [d['id'] for d in decoded] == [f'clip_{i:04d}' for i in range(7)]
  with shards.ShardedWriter(tmp_path / 'b', 'train', SMALL, 7, 3) as writer:
    for i in range(7):
      writer.write(make_example(SMALL, i))
  assert tree_bytes(tmp_path / 'a') == tree_bytes(tmp_path / 'b')
  with pytest.raises(ValueError, match='holds shards of another ShardSpec'):
    shards.write_split(tmp_path / 'a', 'test', FULL, [], 1, 1)
  with pytest.raises(FileNotFoundError, match="split 'test' was never completely written"):
    shards.read_manifest(tmp_path / 'a', 'test')


def test_streaming_writer_failure_keeps_finished_shards_only(tmp_path):
  with pytest.raises(RuntimeError, match='boom'):
    with shards.ShardedWriter(tmp_path, 'train', SMALL, 7, 3) as writer:
      for i in range(5):
        writer.write(make_example(SMALL, i))
      raise RuntimeError('boom')
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'spec.json', 'train-00000-of-00003.tfrecord', 'train-00000-of-00003.tfrecord.index']


def test_write_split_resumes_without_recomputing(tmp_path):
  """A kill in shard 2 of 4; the rerun computes only shards 2 and 3 and matches a clean build."""
  shards.write_split(tmp_path / 'clean', 'train', SMALL, lambda i: make_example(SMALL, i), 10, 3)
  calls = []

  def counting(i):
    calls.append(i)
    return make_example(SMALL, i)

  def dying(i):
    if i == 7:
      raise KeyboardInterrupt  # a kill while writing shard 2 (examples 6..8)
    return counting(i)

  with pytest.raises(KeyboardInterrupt):
    shards.write_split(tmp_path / 'run', 'train', SMALL, dying, 10, 3)
  assert calls == [0, 1, 2, 3, 4, 5, 6]
  assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == ['spec.json'] + [
      f'train-0000{k}-of-00004.tfrecord{ext}' for k in (0, 1) for ext in ('', '.index')]
  leftover = files.temp_sibling(tmp_path / 'run' / 'train-00002-of-00004.tfrecord')  # as a SIGKILL leaves it
  leftover.write_bytes(b'partial')
  calls.clear()
  shards.write_split(tmp_path / 'run', 'train', SMALL, counting, 10, 3)
  assert calls == [6, 7, 8, 9]
  assert tree_bytes(tmp_path / 'run') == tree_bytes(tmp_path / 'clean')
  # From an iterable: the kept shards' items are skipped, the result is identical again.
  (tmp_path / 'run' / 'train-00001-of-00004.tfrecord').unlink()
  shards.write_split(tmp_path / 'run', 'train', SMALL, (make_example(SMALL, i) for i in range(10)), 10, 3)
  assert tree_bytes(tmp_path / 'run') == tree_bytes(tmp_path / 'clean')
  with pytest.raises(ValueError, match='more examples than the 10 announced'):
    shards.write_split(tmp_path / 'more', 'train', SMALL, (make_example(SMALL, i) for i in range(11)), 10, 3)
  with pytest.raises(ValueError, match='the examples ended before example 9 of 10'):
    shards.write_split(tmp_path / 'less', 'train', SMALL, (make_example(SMALL, i) for i in range(9)), 10, 3)
