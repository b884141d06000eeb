"""Atomic file output, the project's one way to write a file a reader may see half-written.

Every output (checkpoint exports, shards, WAV/MP4/PNG/JSON) is written to a hidden temporary sibling
and renamed onto its final name once complete, so an interrupted or failed write never leaves a
partial file under that name and never replaces a good one with a broken one.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import uuid
from typing import Any, Iterator


def _fsync(path: str | os.PathLike) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def temp_sibling(path: str | os.PathLike) -> pathlib.Path:
  """A unique hidden name beside `path` (same filesystem, so the rename is atomic) that keeps its
  suffix: writers such as PyAV and matplotlib pick the format by it."""
  path = pathlib.Path(path)
  return path.with_name(f'.{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}')


def stale_temps(path: str | os.PathLike) -> list[pathlib.Path]:
  """The temporary siblings of `path` that a killed writer left behind."""
  path = pathlib.Path(path)
  return sorted(path.parent.glob(f'.{path.stem}.*.tmp{path.suffix}'))


def commit(tmp: str | os.PathLike, path: str | os.PathLike, durable: bool = False) -> None:
  """Moves the finished `tmp` onto `path` in one step (readers see all or nothing). `durable`: fsync
  the file first and the directory after, so the new file survives a power cut once this returns."""
  if durable:
    _fsync(tmp)
  os.replace(tmp, path)
  if durable and os.name == 'posix':
    _fsync(pathlib.Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling of `path` to write; commits it onto `path` when the block ends
  without an error, removes it otherwise."""
  tmp = temp_sibling(path)
  try:
    yield tmp
    commit(tmp, path, durable)
  finally:
    tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> None:
  with atomic_path(path, durable) as tmp:
    tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str, durable: bool = False) -> None:
  with atomic_path(path, durable) as tmp:
    tmp.write_text(text, encoding='utf-8')


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
  """`obj` as JSON (non-JSON values through `str`)."""
  write_text(path, json.dumps(obj, indent=indent, default=str) + '\n')
