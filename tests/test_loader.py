"""The Grain pipeline over TFRecord shards: determinism, exact resume, per-process slices, global arrays.

The shard format itself is proven against TensorFlow's files (tests/fixtures/tfrecord/) in
tests/test_shards.py; here a small split is written with `write_split` and read back.
"""
import json
import pickle
import shutil

import grain
import jax
import numpy as np
import pytest
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from visaudio_jax.data import loader, schema, shards, tfrecord

SPEC = schema.ShardSpec(clip_f=(4, 8), sync_f=(8, 6), text_f=(3, 8), latent=(2, 5, 4), storage_dtype='float16')
NUM = 24


def make_example(i: int) -> dict:
  rng = np.random.default_rng(i)
  example = {'id': f'clip_{i:02d}', 'caption': f'caption {i}', 'duration_s': 1.0 + i}
  for name, feat in schema.features(SPEC).items():
    example.setdefault(name, rng.standard_normal(feat.shape).astype(np.float32))
  return example


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('shards')
  shards.write_split(directory, 'train', SPEC, make_example, NUM, 5)  # 5 shards, the last of 4
  return directory


def take(ds_or_it, n: int) -> list[dict]:
  it = iter(ds_or_it)
  return [next(it) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def test_source_maps_global_index_to_shard_record(data_dir):
  source = loader.ShardDataSource(shards.shard_paths(data_dir, 'train'))
  assert isinstance(source, grain.sources.RandomAccessDataSource) and len(source) == NUM
  order = np.random.default_rng(0).permutation(NUM).tolist()
  assert [schema.decode_example(SPEC, source[i])['id'] for i in order] == [f'clip_{i:02d}' for i in order]
  clone = pickle.loads(pickle.dumps(source))  # what Grain workers receive
  assert clone[17] == source[17]
  with pytest.raises(IndexError):
    source[NUM]


def test_batches_decode_and_depend_only_on_seed(data_dir):
  batches = take(loader.make_dataset(data_dir, 'train', SPEC, 4, seed=3), 8)  # crosses an epoch
  assert batches[0]['clip_f'].shape == (4, 4, 8) and batches[0]['clip_f'].dtype == np.float32
  first = int(batches[0]['id'][0][5:])
  np.testing.assert_allclose(batches[0]['clip_f'][0], make_example(first)['clip_f'], rtol=2.0**-11, atol=1e-7)
  assert batches[0]['duration_s'][0] == 1.0 + first
  epoch = [i for b in batches[:6] for i in b['id']]
  assert sorted(epoch) == [f'clip_{i:02d}' for i in range(NUM)] and epoch != sorted(epoch)
  assert_batches_equal(batches, take(loader.make_dataset(data_dir, 'train', None, 4, seed=3), 8))
  other = take(loader.make_dataset(data_dir, 'train', SPEC, 4, seed=4), 6)
  assert [i for b in other for i in b['id']] != epoch
  plain = take(loader.make_dataset(data_dir, 'train', SPEC, 4, seed=3, shuffle=False), 1)
  assert plain[0]['id'].tolist() == ['clip_00', 'clip_01', 'clip_02', 'clip_03']


def test_resume_from_state_reproduces_the_run(data_dir):
  uninterrupted = take(loader.make_dataset(data_dir, 'train', SPEC, 4, seed=0), 9)
  it = iter(loader.make_dataset(data_dir, 'train', SPEC, 4, seed=0))
  assert_batches_equal([next(it) for _ in range(3)], uninterrupted[:3])
  state = json.loads(json.dumps(it.get_state()))  # as saved in a checkpoint
  fresh = iter(loader.make_dataset(data_dir, 'train', SPEC, 4, seed=0))
  fresh.set_state(state)
  assert_batches_equal([next(fresh) for _ in range(6)], uninterrupted[3:])


@pytest.mark.integration
def test_worker_processes_give_the_same_batches(data_dir):
  # Grain's mp_prefetch reads absl flags of its own (grain 0.2.18), which raise unparsed outside an
  # absl app; train.py and the benches are absl apps, a test is not: take the flags' defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  it = iter(loader.make_dataset(data_dir, 'train', SPEC, 4, seed=0, worker_count=1))
  try:
    assert_batches_equal([next(it) for _ in range(3)], take(loader.make_dataset(data_dir, 'train', SPEC, 4, seed=0), 3))
  finally:
    it.close()


def test_processes_split_each_epoch(data_dir):
  seen = []
  for process_index in (0, 1):
    ds = loader.make_dataset(data_dir, 'train', SPEC, 4, seed=0, num_epochs=1, process_index=process_index,
                             process_count=2)
    batches = list(ds)
    assert len(batches) == NUM // 4 and all(len(b['id']) == 2 for b in batches)
    seen.append({i for b in batches for i in b['id']})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {f'clip_{i:02d}' for i in range(NUM)}


def test_global_batches_do_not_depend_on_the_process_count(data_dir):
  """Process p holds the p-th contiguous chunk of each global batch: two processes' batches, stacked,
  are the one-process batches (so multi-host training sees the same global batch, in the same order)."""
  single = list(loader.make_dataset(data_dir, 'train', SPEC, 4, seed=0, num_epochs=1))
  parts = [list(loader.make_dataset(data_dir, 'train', SPEC, 4, seed=0, num_epochs=1, process_index=p,
                                    process_count=2)) for p in (0, 1)]
  assert len(single) == len(parts[0]) == len(parts[1]) == NUM // 4
  for k, batch in enumerate(single):
    assert list(batch['id']) == list(parts[0][k]['id']) + list(parts[1][k]['id'])


def test_bad_arguments(data_dir):
  with pytest.raises(ValueError, match='global_batch 3 must be a positive multiple of the process count 2'):
    loader.make_dataset(data_dir, 'train', SPEC, 3, 0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match=r'process_index 2 not in \[0, 2\)'):
    loader.make_dataset(data_dir, 'train', SPEC, 4, 0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match='holds examples of'):
    loader.make_dataset(data_dir, 'train', schema.ShardSpec((4, 8), (8, 6), (3, 8), (2, 5, 4)), 4, 0)
  with pytest.raises(ValueError, match='1 epoch.s. give no batch of 32'):
    loader.make_dataset(data_dir, 'train', SPEC, 32, 0, num_epochs=1)


def test_corrupt_record_raises_or_is_replaced(data_dir, tmp_path):
  broken = tmp_path / 'broken'
  shutil.copytree(data_dir, broken)
  shard = broken / 'train-00001-of-00005.tfrecord'  # examples 5..9
  index = tfrecord.load_index(shard)
  data = bytearray(shard.read_bytes())
  data[int(index.offsets[2]) + 40] ^= 0xFF  # inside the payload of example 7
  shard.write_bytes(bytes(data))
  with pytest.raises(tfrecord.CorruptRecordError, match=f'corrupted record at {int(index.offsets[2]) + 12} '):
    list(loader.make_dataset(broken, 'train', SPEC, 4, 0, num_epochs=1))
  ids = [i for b in loader.make_dataset(broken, 'train', SPEC, 4, 0, num_epochs=1, skip_corrupt=True) for i in b['id']]
  assert len(ids) == NUM and 'clip_07' not in ids and ids.count('clip_08') == 2
  source = loader.ShardDataSource(shards.shard_paths(broken, 'train'), skip_corrupt=True)
  assert schema.decode_example(SPEC, source[7])['id'] == 'clip_08' and source.num_corrupt == 1


def test_to_global_arrays_on_a_data_mesh(data_dir):
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  batch = take(loader.make_dataset(data_dir, 'train', SPEC, 8, seed=0), 1)[0]
  arrays = loader.to_global_arrays(batch, sharding)
  assert set(arrays) == set(batch) - {'id', 'caption'}
  for name, array in arrays.items():
    assert array.shape == batch[name].shape and array.sharding == sharding, name
    assert len(array.addressable_shards) == 8 and array.addressable_shards[0].data.shape[0] == 1
    np.testing.assert_array_equal(np.asarray(array), batch[name])
