"""Writing a split of clip examples as TFRecord shards, resumably.

Layout of a dataset directory:
  spec.json                               the ShardSpec of every split here (schema.write_spec)
  <split>-00000-of-00004.tfrecord         shards of `examples_per_shard` examples (the last may be short)
  <split>-00000-of-00004.tfrecord.index   their offset indexes (tfrecord.py)
  <split>.json                            manifest: shard files and example counts, written last

The number of examples is required up front, so shard names carry the shard count (tfds style) and
example i always lands in shard i // examples_per_shard. The manifest is what readers open (no
directory listing, slow on object stores), and it only appears once every shard is complete, so a
half-built split cannot be read by accident.

Resuming: encoding is deterministic, so a build is a pure function of the ordered examples. A rerun
of `write_split` keeps every shard that is complete (final name present, index valid against it,
right example count) and rewrites the others, byte-identical to an uninterrupted build. Given a
function of the example index, the examples of kept shards are never computed.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from visaudio_jax import files
from visaudio_jax.data.schema import SPEC_FILE, ShardSpec, encode_example, read_spec, write_spec
from visaudio_jax.data.tfrecord import StaleIndexError, TFRecordWriter, index_path, load_index

__all__ = ['ShardedWriter', 'write_split', 'shard_name', 'read_manifest', 'shard_paths']

log = logging.getLogger(__name__)

_MANIFEST_FORMAT = 1
Example = Mapping[str, Any]


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f'{split}-{shard:05d}-of-{num_shards:05d}.tfrecord'


def _manifest_path(directory: Path, split: str) -> Path:
  return directory / f'{split}.json'


def _shard_ranges(num_examples: int, examples_per_shard: int) -> list[range]:
  if num_examples < 1 or examples_per_shard < 1:
    raise ValueError(f'need num_examples >= 1 and examples_per_shard >= 1, got {num_examples} and '
                     f'{examples_per_shard}')
  starts = range(0, num_examples, examples_per_shard)
  return [range(s, min(s + examples_per_shard, num_examples)) for s in starts]


def _prepare(directory: str | os.PathLike, split: str, spec: ShardSpec, num_examples: int,
             examples_per_shard: int) -> tuple[Path, list[Path], list[range]]:
  """Checks the directory's spec (written on first use) and lays out the shards."""
  if not split or '/' in split or split.startswith('.'):
    raise ValueError(f'bad split name {split!r}')
  directory = Path(directory)
  ranges = _shard_ranges(num_examples, examples_per_shard)
  if (directory / SPEC_FILE).exists():
    stored = read_spec(directory)
    if stored != spec:
      raise ValueError(f'{directory} holds shards of another ShardSpec ({stored}); write {spec} to a new '
                       'directory')
  else:
    write_spec(directory, spec)
  paths = [directory / shard_name(split, k, len(ranges)) for k in range(len(ranges))]
  return directory, paths, ranges


def _write_manifest(directory: Path, split: str, examples_per_shard: int, paths: list[Path],
                    ranges: list[range]) -> None:
  manifest = {'format': _MANIFEST_FORMAT, 'split': split, 'num_examples': ranges[-1].stop,
              'examples_per_shard': examples_per_shard,
              'shards': [{'file': p.name, 'num_examples': len(r)} for p, r in zip(paths, ranges)]}
  files.write_bytes(_manifest_path(directory, split), json.dumps(manifest, indent=1).encode(), durable=True)


def read_manifest(directory: str | os.PathLike, split: str) -> dict:
  path = _manifest_path(Path(directory), split)
  try:
    manifest = json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: no manifest, so split {split!r} was never completely written '
                            f'to {os.fspath(directory)}') from None
  if manifest.get('format') != _MANIFEST_FORMAT:
    raise ValueError(f'{path}: not a shard manifest of format {_MANIFEST_FORMAT}')
  return manifest


def shard_paths(directory: str | os.PathLike, split: str) -> list[Path]:
  """The split's shards, in example order, from its manifest."""
  return [Path(directory) / s['file'] for s in read_manifest(directory, split)['shards']]


class ShardedWriter:
  """Streams `num_examples` examples into a split's shards, e.g. straight from an extraction loop.

  Each shard is atomic (tfrecord.TFRecordWriter); an exception inside the `with` block drops the
  shard in progress and writes no manifest, keeping the shards already finished. This writer always
  rewrites; `write_split` is the resumable form.
  """

  def __init__(self, directory: str | os.PathLike, split: str, spec: ShardSpec, num_examples: int,
               examples_per_shard: int):
    self.spec, self.split, self.examples_per_shard = spec, split, examples_per_shard
    self.directory, self.paths, self._ranges = _prepare(directory, split, spec, num_examples, examples_per_shard)
    self._count = 0
    self._writer: TFRecordWriter | None = None

  def __enter__(self) -> ShardedWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    elif self._writer is not None:
      self._writer.abort()

  def write(self, example: Example) -> None:
    num_examples = self._ranges[-1].stop
    if self._count == num_examples:
      raise ValueError(f'{self.split}: more than the {num_examples} examples announced')
    shard = self._count // self.examples_per_shard
    if self._writer is None:
      self._writer = TFRecordWriter(self.paths[shard])
    self._writer.write(encode_example(self.spec, example))
    self._count += 1
    if self._count == self._ranges[shard].stop:
      self._writer.close()
      self._writer = None

  def close(self) -> list[Path]:
    """Writes the manifest once all examples are in; returns the shard paths."""
    if self._count != self._ranges[-1].stop:
      raise ValueError(f'{self.split}: {self._count} examples written, {self._ranges[-1].stop} announced')
    _write_manifest(self.directory, self.split, self.examples_per_shard, self.paths, self._ranges)
    return self.paths


def _complete(path: Path, num_records: int) -> bool:
  if not path.exists():
    return False
  try:
    return len(load_index(path, verify=True)) == num_records
  except StaleIndexError as err:
    log.warning('redoing %s: %s', path, err)
    return False


def write_split(directory: str | os.PathLike, split: str, spec: ShardSpec,
                examples: Iterable[Example] | Callable[[int], Example], num_examples: int,
                examples_per_shard: int) -> list[Path]:
  """Writes (or finishes) a split; returns its shard paths.

  `examples` is either a function of the example index, called only for the shards to (re)write, or
  an iterable in example order, whose items for complete shards are skipped (still computed by the
  iterable itself). Both must give the same examples on every run for the rebuild to be identical.
  """
  directory, paths, ranges = _prepare(directory, split, spec, num_examples, examples_per_shard)
  items = None if callable(examples) else iter(examples)
  taken = 0  # items drawn from `items`

  def example(i: int) -> Example:
    if items is None:
      return examples(i)
    item = next(items, None)
    if item is None:
      raise ValueError(f'{split}: the examples ended before example {i} of {num_examples}')
    return item

  for path, indices in zip(paths, ranges):
    if _complete(path, len(indices)):
      log.info('keeping complete shard %s', path)
      continue
    for stale in files.stale_temps(path) + files.stale_temps(index_path(path)):  # left by a killed run
      stale.unlink(missing_ok=True)
    if items is not None:  # skip the items of the kept shards before this one
      next(itertools.islice(items, indices.start - taken, indices.start - taken), None)
      taken = indices.stop
    with TFRecordWriter(path) as writer:
      for i in indices:
        writer.write(encode_example(spec, example(i)))
    log.info('wrote %s (%d examples)', path, len(indices))
  if items is not None and taken == num_examples and next(items, None) is not None:
    raise ValueError(f'{split}: more examples than the {num_examples} announced')
  _write_manifest(directory, split, examples_per_shard, paths, ranges)
  return paths
