"""Grain input pipeline over the TFRecord shards: global shuffle, per-process slice, exact resume.

`make_dataset` follows MaxText's order: shuffle the whole split with one seed on every host, repeat,
then take this process's slice, so the hosts together see each example once per epoch and the
stream is a pure function of (seed, step); each global batch is the same whatever the process count.
Iterator state (`it.get_state()`) is a small JSON-able dict; `it.set_state(state)` on a fresh
iterator continues with exactly the batches the uninterrupted run would have produced.
`to_global_arrays` assembles the per-process batches into global `jax.Array`s for a multi-host mesh.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence

import grain
import jax
import numpy as np

from visaudio_jax.data.schema import ShardSpec, decode_example, read_spec
from visaudio_jax.data.shards import shard_paths
from visaudio_jax.data.tfrecord import ShardReader

__all__ = ['ShardDataSource', 'make_dataset', 'first_batches', 'to_global_arrays']


class ShardDataSource(grain.sources.RandomAccessDataSource):
  """Serialized examples of many shards under one global index (shard order, then file order).

  The indexes are loaded (and checked) when the source is built, in the main process; it pickles
  without file handles, so Grain can ship it to worker processes.

  `skip_corrupt=True`: a corrupt record is replaced by the next good one in index order, so batches
  keep their static shape and the stream stays a pure function of the index (resumable, and
  independent of the worker count); the replacement then appears twice in that epoch. Each skip is
  logged and counted in `num_corrupt` (per process: Grain workers count their own).
  """

  def __init__(self, paths: Sequence[str | os.PathLike], *, skip_corrupt: bool = False):
    if not paths:
      raise ValueError('ShardDataSource needs at least one shard')
    self._readers = [ShardReader(p, skip_corrupt=skip_corrupt) for p in paths]
    self._starts = np.cumsum([0] + [len(r) for r in self._readers])  # (num_shards + 1,)
    if self._starts[-1] == 0:
      raise ValueError(f'the shards {[os.fspath(p) for p in paths][:3]}... hold no records')

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __repr__(self) -> str:
    first = os.fspath(self._readers[0].path)
    return f'ShardDataSource({len(self._readers)} shards from {first!r}, {len(self)} records)'

  @property
  def num_corrupt(self) -> int:
    return sum(r.num_corrupt for r in self._readers)

  def _read(self, index: int) -> bytes | None:
    shard = int(np.searchsorted(self._starts, index, side='right')) - 1
    return self._readers[shard][index - int(self._starts[shard])]

  def __getitem__(self, index: int) -> bytes:
    n = len(self)
    if not 0 <= index < n:
      raise IndexError(f'record {index} out of range for {n} records')
    for step in range(n):
      record = self._read((index + step) % n)
      if record is not None:
        return record
    raise ValueError(f'{self!r}: every record is corrupt')


def make_dataset(directory: str | os.PathLike, split: str, spec: ShardSpec | None, global_batch: int,
                 seed: int, *, shuffle: bool = True, num_epochs: int | None = None, worker_count: int = 0,
                 process_index: int | None = None, process_count: int | None = None,
                 skip_corrupt: bool = False) -> grain.IterDataset:
  """Batches of `global_batch // process_count` decoded examples for this process.

  `spec` must equal the directory's `spec.json` (None: use it). `num_epochs=None` repeats forever,
  reshuffling each epoch; batches run across epoch boundaries and only a final partial batch is
  dropped. `worker_count > 0` decodes in that many Grain processes (same batches for a given count).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f'global_batch {global_batch} must be a positive multiple of the process count '
                     f'{process_count}: each process loads an equal share')
  stored = read_spec(directory)
  if spec is not None and spec != stored:
    raise ValueError(f'{os.fspath(directory)} holds examples of {stored}, not the requested {spec}')
  source = ShardDataSource(shard_paths(directory, split), skip_corrupt=skip_corrupt)
  per_process = global_batch // process_count
  if num_epochs is not None and len(source) * num_epochs < global_batch:
    raise ValueError(f'split {split!r} has {len(source)} examples: {num_epochs} epoch(s) give no batch of '
                     f'{global_batch} ({per_process} per process)')
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed)
  # Lazy: only this process's examples are ever read and decoded. Process p takes every P-th
  # per-process batch, so global batch k is stream examples [k B, (k + 1) B) with process p holding
  # the p-th contiguous chunk: the same global batch, in the same order, for any process count.
  ds = ds.repeat(num_epochs).map(functools.partial(decode_example, stored))
  ds = ds.batch(per_process, drop_remainder=True)
  if num_epochs is not None:  # whole global batches only, so every process gets as many
    ds = ds[:len(ds) // process_count * process_count]
  ds = ds[process_index::process_count].to_iter_dataset()
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return ds


def first_batches(directory: str | os.PathLike, split: str, batch_size: int, count: int,
                  num_epochs: int | None = None) -> list[dict[str, np.ndarray]]:
  """The first `count` batches of a split, unshuffled: the same examples at every evaluation. With
  `num_epochs`, fewer when the split runs out."""
  it = iter(make_dataset(directory, split, None, batch_size, 0, shuffle=False, num_epochs=num_epochs))
  return [batch for _, batch in zip(range(count), it)]


def to_global_arrays(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """This process's batch -> global arrays whose leading (batch) axis is laid out by `sharding`.

  Every process passes its own slice; text fields (id, caption) stay on the host and are left out.
  """
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()
          if np.asarray(v).dtype.kind in 'biuf'}
