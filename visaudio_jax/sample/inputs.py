"""What `sample.py` is asked to generate: videos given as files, directories, globs or a manifest CSV,
with captions, each under an output id. Problems that concern one clip (a missing file, a caption row
with no video) become failed items that are reported while the others go on; problems that make the
request itself ambiguous (two clips with one output name, a caption count that fits no video list)
are errors before any work starts.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import os
import pathlib
from typing import Sequence

from visaudio_jax.data import extraction

VIDEO_SUFFIXES = ('.mp4', '.mov', '.mkv', '.avi', '.webm', '.m4v')


@dataclasses.dataclass(frozen=True)
class Item:
  """One clip to generate: its output id, its video and caption, or why it cannot be generated."""
  id: str
  video: str
  caption: str = ''
  error: str = ''


def _expand(entry: str) -> list[str] | None:
  """A file, a directory (its videos, sorted) or a glob (its matches, sorted); None: nothing there."""
  if os.path.isdir(entry):
    return sorted(str(p) for p in pathlib.Path(entry).iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
  if glob.has_magic(entry):
    return sorted(p for p in glob.glob(entry) if os.path.isfile(p)) or None
  return [entry] if os.path.exists(entry) else None


def _read_csv(path: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
  try:
    with open(path, newline='', encoding='utf-8') as f:
      reader = csv.DictReader(f)
      missing = [c for c in columns if c not in (reader.fieldnames or [])]
      if missing:
        raise ValueError(f'{path}: CSV header {reader.fieldnames} lacks columns {missing}; expected {list(columns)}')
      return [{k: (row.get(k) or '').strip() for k in reader.fieldnames} for row in reader]
  except OSError as e:
    raise ValueError(f'{path}: cannot read the CSV ({e})') from e


def read_manifest(path: str) -> list[Item]:
  """A CSV `id,video,caption` (caption optional), or a dataset's JSON-lines manifest (`.jsonl`, as
  BiAudio-mini and `data_prep/extract_features.py` use; its wav column is ignored); videos relative to
  the manifest's folder."""
  if path.endswith('.jsonl'):
    return [Item(c.id, c.video, c.caption) for c in extraction.read_manifest(path)]
  rows = _read_csv(path, ('id', 'video'))
  base = os.path.dirname(os.path.abspath(path))
  items = []
  for n, row in enumerate(rows, start=2):
    clip_id, video = row['id'], row['video']
    if not clip_id:
      raise ValueError(f'{path}: line {n} has no id')
    if not video:
      items.append(Item(clip_id, '', row.get('caption', ''), f'{path} line {n}: no video given'))
      continue
    items.append(Item(clip_id, os.path.join(base, video), row.get('caption', '')))
  return items


def gather(videos: Sequence[str] = (), manifest: str | None = None, captions_csv: str | None = None,
           captions: Sequence[str] = ()) -> list[Item]:
  """The items to generate, ids checked unique. `videos`: files, directories or globs (id = file
  stem); `manifest`: see `read_manifest`; captions by `captions_csv` (`id,caption`: every video
  needs a row, every row a video) or `captions` (one for all, or one per video in order)."""
  if bool(videos) == bool(manifest):
    raise ValueError('give videos (--video, files, folders or globs) or a manifest CSV (--manifest), not both or neither')
  if captions_csv and captions:
    raise ValueError('captions come from --captions (a CSV) or --caption (repeated), not both')
  if manifest:
    items = read_manifest(manifest)
  else:
    items = []
    for entry in videos:
      found = _expand(entry)
      if found is None:
        items.append(Item(pathlib.Path(entry).stem or entry, entry, error=f'{entry}: no such file, folder or glob match'))
      items += [Item(pathlib.Path(p).stem, p) for p in found or ()]
  if captions:
    if len(captions) not in (1, len(items)):
      raise ValueError(f'{len(captions)} captions for {len(items)} videos: give one for all or one per video')
    texts = list(captions) * (len(items) if len(captions) == 1 else 1)
    items = [dataclasses.replace(it, caption=c) for it, c in zip(items, texts)]
  if captions_csv:
    table = {row['id']: row['caption'] for row in _read_csv(captions_csv, ('id', 'caption'))}
    known = {it.id for it in items}
    items = [dataclasses.replace(it, caption=table[it.id]) if it.id in table else
             dataclasses.replace(it, error=it.error or f'{captions_csv}: no caption row for id {it.id!r} '
                                 '(add one; an empty caption means none)') for it in items]
    items += [Item(clip_id, '', error=f'{captions_csv}: caption row {clip_id!r} matches no video')
              for clip_id in table if clip_id not in known]
  seen, duplicates = {}, []
  for it in items:
    if it.id in seen:
      duplicates.append(f'{it.id!r} ({seen[it.id] or "-"} and {it.video or "-"})')
    seen.setdefault(it.id, it.video)
  if duplicates:
    raise ValueError('two clips would write the same output: ' + ', '.join(duplicates) +
                     '; rename the files or use a manifest CSV with unique ids')
  if not items:
    raise ValueError('no videos found')
  return items
