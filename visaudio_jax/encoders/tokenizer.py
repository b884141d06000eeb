"""The CLIP text tokenizer: OpenAI CLIP's byte-level BPE as open_clip's `SimpleTokenizer` runs it.

MMAudio tokenizes captions with `open_clip.get_tokenizer('ViT-H-14-378-quickgelu')`, i.e. this BPE
over `data/bpe_simple_vocab_16e6.txt.gz` (shipped here, MIT, see `data/README.md`) with the 'lower'
cleaning: ftfy.fix_text -> html.unescape twice -> strip -> collapse whitespace -> lower-case. Rows
are [sot, bpe..., eot, 0...] of `context_length` ids; longer ones are cut and end in eot. The word
split uses the `regex` package's \\p{L} / \\p{N} classes, as open_clip does (`re` has no \\p).

Building the 48,894 merge ranks takes a fraction of a second, so the vocabulary is loaded once per
file and shared by every `ClipTokenizer`.
"""
from __future__ import annotations

import functools
import gzip
import html
import itertools
import os
import pathlib

import ftfy
import numpy as np
import regex

DEFAULT_BPE = pathlib.Path(__file__).parent / 'data' / 'bpe_simple_vocab_16e6.txt.gz'
SPECIAL_TOKENS = ('<start_of_text>', '<end_of_text>')
NUM_MERGES = 49152 - 256 - 2  # open_clip reads merge lines [1, 48895): 49,408 ids in all


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map (no whitespace or control characters)."""
  bs = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def clean_text(text: str) -> str:
  """open_clip's 'lower' cleaning (`_clean_lower`)."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return ' '.join(text.split()).strip().lower()


@functools.lru_cache(maxsize=4)
def _load_vocab(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
  """(token -> id, merge pair -> rank) from a gzipped merges file, as open_clip builds them."""
  with gzip.open(path) as f:
    merges = f.read().decode('utf-8').split('\n')[1:NUM_MERGES + 1]
  merges = [tuple(m.split()) for m in merges]
  vocab = list(bytes_to_unicode().values())
  vocab += [v + '</w>' for v in vocab]
  vocab += [''.join(m) for m in merges]
  vocab += SPECIAL_TOKENS
  return {t: i for i, t in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}


class ClipTokenizer:
  """`tok(texts, context_length=77)` -> int64 (N, context_length), ids identical to open_clip's."""

  def __init__(self, bpe_path: str | os.PathLike | None = None):
    self.encoder, self.bpe_ranks = _load_vocab(os.fspath(bpe_path or DEFAULT_BPE))
    self.byte_encoder = bytes_to_unicode()
    self.sot_token_id = self.encoder[SPECIAL_TOKENS[0]]
    self.eot_token_id = self.encoder[SPECIAL_TOKENS[1]]
    self.pad_token_id = 0
    self.vocab_size = len(self.encoder)
    self._cache = {t: t for t in SPECIAL_TOKENS}
    specials = '|'.join(SPECIAL_TOKENS)
    self._pattern = regex.compile(
        specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

  def bpe(self, token: str) -> str:
    """One pre-token (byte-mapped) -> its space-separated BPE pieces, the last one ending in </w>."""
    if token in self._cache:
      return self._cache[token]
    word = tuple(token[:-1]) + (token[-1] + '</w>',)
    while len(word) > 1:
      pairs = set(itertools.pairwise(word))
      bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float('inf')))
      if bigram not in self.bpe_ranks:
        break
      first, second = bigram
      merged, i = [], 0
      while i < len(word):  # merge every occurrence of the best-ranked pair, left to right
        if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    out = ' '.join(word)
    if len(self._cache) < 100_000:
      self._cache[token] = out
    return out

  def encode(self, text: str) -> list[int]:
    """Cleaned text -> BPE ids, without sot / eot."""
    ids = []
    for token in self._pattern.findall(clean_text(text)):
      token = ''.join(self.byte_encoder[b] for b in token.encode('utf-8'))
      ids.extend(self.encoder[piece] for piece in self.bpe(token).split(' '))
    return ids

  def decode(self, ids) -> str:
    """Ids -> text as open_clip decodes it (word ends become spaces); for inspection only."""
    decoder = {i: t for t, i in self.encoder.items()}
    byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    text = ''.join(decoder[int(i)] for i in ids)
    return bytearray(byte_decoder[c] for c in text).decode('utf-8', errors='replace').replace('</w>', ' ')

  def __call__(self, texts: str | list[str], context_length: int = 77) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    if context_length < 1:
      raise ValueError(f'context_length must be positive, got {context_length}')
    out = np.zeros((len(texts), context_length), np.int64)  # pad id 0
    for row, text in zip(out, texts):
      ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
      if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = self.eot_token_id
      row[:len(ids)] = ids
    return out
