"""TFRecord files without TensorFlow: the framing tf.data reads, plus a sidecar offset index.

A record is framed as `uint64 LE length | masked crc32c(length bytes) | payload | masked
crc32c(payload)`, with masked = ((crc >> 15) | (crc << 17)) + 0xa282ead8 mod 2^32, so shards written
here are ordinary TFRecord files. Grain needs random access (global shuffle, exact resume), which the
format alone does not give, so every shard carries `<shard>.index`:

  b'VATFRIX1' | uint64 num_records | uint64 shard_size | uint32 frames_crc
  | uint64[num_records] frame offsets | uint64[num_records] payload lengths | uint32 crc32c(all above)

(little-endian). `frames_crc` is the crc32c of the shard's payload checksums (the 4-byte frame
footers, in order): it identifies the shard's contents, so `load_index(verify=True)` detects an index
left from an earlier build even when the shard size matches, reading only 16 bytes per record.

Errors follow tf.data: 'corrupted record at N' / 'truncated record at N', where N is the offset of the
checksummed chunk that failed (the frame for its length header, frame + 12 for its payload) and
truncation names the frame.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import numpy as np

from visaudio_jax import files

__all__ = ['CorruptRecordError', 'StaleIndexError', 'ShardIndex', 'TFRecordWriter', 'RecordIterator',
           'ShardReader', 'read_records', 'build_index', 'load_index', 'index_path', 'masked_crc32c']

log = logging.getLogger(__name__)

_LENGTH = struct.Struct('<Q')
_CRC = struct.Struct('<I')
_HEADER_SIZE = _LENGTH.size + _CRC.size  # 12
_FRAME_OVERHEAD = _HEADER_SIZE + _CRC.size  # 16
_MASK_DELTA = 0xA282EAD8
_INDEX_MAGIC = b'VATFRIX1'
_INDEX_HEAD = struct.Struct('<8sQQI')  # magic, num_records, shard_size, frames_crc


class CorruptRecordError(ValueError):
  """A frame fails a CRC or ends early. `offset` is tf.data's number; `frame_offset` where the frame
  starts; `next_offset` where the next frame starts when the length field was intact, else None."""

  def __init__(self, path: str | os.PathLike, kind: str, offset: int, frame_offset: int,
               next_offset: int | None, detail: str):
    self.path, self.kind, self.offset = os.fspath(path), kind, offset
    self.frame_offset, self.next_offset, self.detail = frame_offset, next_offset, detail
    super().__init__(f'{self.path}: {kind} record at {offset} ({detail}; frame at byte {frame_offset})')

  def __reduce__(self):  # survives the trip from a Grain worker process
    return type(self), (self.path, self.kind, self.offset, self.frame_offset, self.next_offset, self.detail)


class StaleIndexError(ValueError):
  """A shard's index is missing, damaged, or describes other contents than the shard's."""


def masked_crc32c(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def index_path(path: str | os.PathLike) -> Path:
  path = Path(path)
  return path.with_name(path.name + '.index')


class ShardIndex:
  """Frame offsets and payload lengths of a shard's records, and what identifies the shard."""

  def __init__(self, offsets, lengths, shard_size: int, frames_crc: int):
    self.offsets = np.asarray(offsets, np.uint64)  # (num_records,)
    self.lengths = np.asarray(lengths, np.uint64)  # (num_records,)
    self.shard_size = int(shard_size)
    self.frames_crc = int(frames_crc)

  def __len__(self) -> int:
    return len(self.offsets)

  def __eq__(self, other) -> bool:
    return (isinstance(other, ShardIndex) and self.shard_size == other.shard_size
            and self.frames_crc == other.frames_crc and np.array_equal(self.offsets, other.offsets)
            and np.array_equal(self.lengths, other.lengths))

  def to_bytes(self) -> bytes:
    body = (_INDEX_HEAD.pack(_INDEX_MAGIC, len(self), self.shard_size, self.frames_crc)
            + self.offsets.astype('<u8').tobytes() + self.lengths.astype('<u8').tobytes())
    return body + _CRC.pack(google_crc32c.value(body))

  @classmethod
  def from_bytes(cls, data: bytes, where: str) -> ShardIndex:
    if len(data) < _INDEX_HEAD.size + _CRC.size:
      raise StaleIndexError(f'{where}: index is {len(data)} bytes, too short')
    magic, n, shard_size, frames_crc = _INDEX_HEAD.unpack_from(data)
    if magic != _INDEX_MAGIC:
      raise StaleIndexError(f'{where}: not a shard index (magic {magic!r}, expected {_INDEX_MAGIC!r})')
    want = _INDEX_HEAD.size + 16 * n + _CRC.size
    if len(data) != want:
      raise StaleIndexError(f'{where}: an index of {n} records has {want} bytes, found {len(data)}')
    if _CRC.unpack_from(data, want - _CRC.size)[0] != google_crc32c.value(data[:-_CRC.size]):
      raise StaleIndexError(f'{where}: index checksum mismatch (damaged file)')
    offsets, lengths = np.frombuffer(data, '<u8', 2 * n, _INDEX_HEAD.size).reshape(2, n)
    return cls(offsets, lengths, shard_size, frames_crc)


def _read_frame(fd: int, path: Path, offset: int, file_size: int) -> bytes:
  """The payload of the frame at `offset`, both CRCs checked."""
  header = os.pread(fd, _HEADER_SIZE, offset)
  if len(header) < _HEADER_SIZE:
    raise CorruptRecordError(path, 'truncated', offset, offset, None,
                             f'{len(header)} of {_HEADER_SIZE} header bytes before the end of the file')
  (length,), (length_crc,) = _LENGTH.unpack_from(header), _CRC.unpack_from(header, _LENGTH.size)
  if length_crc != masked_crc32c(header[:_LENGTH.size]):
    raise CorruptRecordError(path, 'corrupted', offset, offset, None, 'length checksum mismatch')
  end = offset + _FRAME_OVERHEAD + length
  if end > file_size:
    raise CorruptRecordError(path, 'truncated', offset, offset, None,
                             f'a {length}-byte payload runs past the end of the file at byte {file_size}')
  payload = os.pread(fd, length, offset + _HEADER_SIZE)
  (payload_crc,) = _CRC.unpack(os.pread(fd, _CRC.size, offset + _HEADER_SIZE + length))
  if payload_crc != masked_crc32c(payload):
    raise CorruptRecordError(path, 'corrupted', offset + _HEADER_SIZE, offset, end, 'payload checksum mismatch')
  return payload


class TFRecordWriter:
  """Writes one shard atomically: a temp file in the same directory, renamed on a clean close.

  An exception inside the `with` block (or `abort()`) deletes the temp file, so a shard under its
  final name is always complete; its index is committed just before the shard's rename.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self._tmp = files.temp_sibling(self.path)
    self._file = open(self._tmp, 'xb')
    self._offsets: list[int] = []
    self._lengths: list[int] = []
    self._frames_crc = 0
    self._size = 0

  def __enter__(self) -> TFRecordWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()

  def __len__(self) -> int:
    return len(self._offsets)

  def write(self, payload: bytes) -> int:
    """Appends one record; returns the byte offset of its frame."""
    length = _LENGTH.pack(len(payload))
    footer = _CRC.pack(masked_crc32c(payload))
    self._file.write(length + _CRC.pack(masked_crc32c(length)))
    self._file.write(payload)
    self._file.write(footer)
    offset = self._size
    self._offsets.append(offset)
    self._lengths.append(len(payload))
    self._frames_crc = google_crc32c.extend(self._frames_crc, footer)
    self._size += _FRAME_OVERHEAD + len(payload)
    return offset

  def close(self) -> ShardIndex:
    """Finishes the shard: its index, then the rename to the final name."""
    index = ShardIndex(self._offsets, self._lengths, self._size, self._frames_crc)
    try:
      self._file.close()
      files.write_bytes(index_path(self.path), index.to_bytes(), durable=True)
      files.commit(self._tmp, self.path, durable=True)
    except BaseException:
      self.abort()
      raise
    return index

  def abort(self) -> None:
    self._file.close()
    self._tmp.unlink(missing_ok=True)


class RecordIterator:
  """Payloads of one shard in file order, every CRC checked.

  With `skip_corrupt=True` bad records are logged, counted in `num_corrupt` and skipped: after a bad
  payload reading goes on with the next frame (the length field was intact), while a bad length field
  or a truncated frame leaves no way to find the next frame and ends the file.
  """

  def __init__(self, path: str | os.PathLike, *, skip_corrupt: bool = False):
    self.path = Path(path)
    self.skip_corrupt = skip_corrupt
    self.num_corrupt = 0
    self._frames = self.frames()

  def __iter__(self) -> RecordIterator:
    return self

  def __next__(self) -> bytes:
    return next(self._frames)[2]

  def frames(self) -> Iterator[tuple[int, int, bytes]]:
    """(frame offset, payload length, payload) of every good frame."""
    with open(self.path, 'rb') as f:
      fd, size, offset = f.fileno(), os.fstat(f.fileno()).st_size, 0
      while offset < size:
        try:
          payload = _read_frame(fd, self.path, offset, size)
        except CorruptRecordError as err:
          if not self.skip_corrupt:
            raise
          self.num_corrupt += 1
          log.warning('skipping %s (%d corrupt in this file so far)', err, self.num_corrupt)
          if err.next_offset is None:
            return
          offset = err.next_offset
          continue
        yield offset, len(payload), payload
        offset += _FRAME_OVERHEAD + len(payload)


def read_records(path: str | os.PathLike, *, skip_corrupt: bool = False) -> RecordIterator:
  """Sequential reader of a TFRecord file (see `RecordIterator`)."""
  return RecordIterator(path, skip_corrupt=skip_corrupt)


def _frames_crc(fd: int, offsets: np.ndarray, lengths: np.ndarray) -> int:
  crc = 0
  for offset, length in zip(offsets.tolist(), lengths.tolist()):
    crc = google_crc32c.extend(crc, os.pread(fd, _CRC.size, offset + _HEADER_SIZE + length))
  return crc


def build_index(path: str | os.PathLike, *, write: bool = True) -> ShardIndex:
  """Index a shard by scanning it (all CRCs checked); the index is written next to it unless
  `write=False`. A corrupt shard raises: its records cannot all be served."""
  path = Path(path)
  frames = [(offset, length) for offset, length, _ in RecordIterator(path).frames()]
  offsets, lengths = np.array(frames, np.uint64).reshape(-1, 2).T
  with open(path, 'rb') as f:
    index = ShardIndex(offsets, lengths, os.fstat(f.fileno()).st_size, _frames_crc(f.fileno(), offsets, lengths))
  if write:
    files.write_bytes(index_path(path), index.to_bytes(), durable=True)
  return index


def load_index(path: str | os.PathLike, *, verify: bool = False) -> ShardIndex:
  """A shard's index after the cheap checks (the index's own checksum, the shard's size) or, with
  `verify=True`, after checking every frame header and the payload checksums against it too."""
  path = Path(path)
  where = os.fspath(index_path(path))
  try:
    data = index_path(path).read_bytes()
  except FileNotFoundError:
    raise StaleIndexError(f'{where}: missing; rebuild it with build_index({os.fspath(path)!r})') from None
  index = ShardIndex.from_bytes(data, where)
  with open(path, 'rb') as f:
    fd = f.fileno()
    size = os.fstat(fd).st_size
    if size != index.shard_size:
      raise StaleIndexError(f'{where}: indexes a shard of {index.shard_size} bytes, {os.fspath(path)} '
                            f'has {size}; rebuild it with build_index')
    if verify:
      for offset, length in zip(index.offsets.tolist(), index.lengths.tolist()):
        header = os.pread(fd, _HEADER_SIZE, offset)
        if header != _LENGTH.pack(length) + _CRC.pack(masked_crc32c(_LENGTH.pack(length))):
          raise StaleIndexError(f'{where}: no frame of {length} bytes at byte {offset} of '
                                f'{os.fspath(path)}; rebuild it with build_index')
      if _frames_crc(fd, index.offsets, index.lengths) != index.frames_crc:
        raise StaleIndexError(f'{where}: payload checksums differ from those of {os.fspath(path)} (an '
                              f'index of an earlier build); rebuild it with build_index')
  return index


class ShardReader:
  """Random access to one shard's records through its index, every read CRC-checked.

  Pickle-safe for Grain's worker processes: no file handle is kept; each read opens the file and
  uses `os.pread`, which is also thread-safe (Grain reads with a thread pool) and keeps the number of
  open files flat however many shards a dataset has. The index is loaded on first use (cheap checks;
  a stale index still cannot serve a wrong record, since each frame's length is checked against it).
  `rebuild_index=True` rebuilds a missing or stale index by scanning the shard instead of raising.
  `skip_corrupt=True` makes a corrupt record read as None, logged and counted in `num_corrupt`.
  """

  def __init__(self, path: str | os.PathLike, *, skip_corrupt: bool = False, rebuild_index: bool = False):
    self.path = Path(path)
    self.skip_corrupt = skip_corrupt
    self.rebuild_index = rebuild_index
    self.num_corrupt = 0
    self._index: ShardIndex | None = None
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    del state['_lock']
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f'ShardReader({os.fspath(self.path)!r})'

  @property
  def index(self) -> ShardIndex:
    if self._index is None:
      try:
        self._index = load_index(self.path)
      except StaleIndexError as err:
        if not self.rebuild_index:
          raise
        log.warning('%s; rebuilding it by scanning the shard', err)
        self._index = build_index(self.path)
    return self._index

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> bytes | None:
    index = self.index
    if not -len(index) <= i < len(index):
      raise IndexError(f'{os.fspath(self.path)}: record {i} out of range for {len(index)} records')
    offset, length = int(index.offsets[i]), int(index.lengths[i])
    fd = os.open(self.path, os.O_RDONLY)
    try:
      payload = _read_frame(fd, self.path, offset, index.shard_size)
      if len(payload) != length:
        raise CorruptRecordError(self.path, 'corrupted', offset, offset, None, f'the frame holds '
                                 f'{len(payload)} bytes, the index says {length}: stale index?')
    except CorruptRecordError as err:
      if not self.skip_corrupt:
        raise
      with self._lock:
        self.num_corrupt += 1
        count = self.num_corrupt
      log.warning('skipping %s (%d corrupt read from this shard so far)', err, count)
      return None
    finally:
      os.close(fd)
    return payload
