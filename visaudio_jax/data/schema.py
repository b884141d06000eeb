"""The clip example stored in the shards, declared once as a `tfds.features.FeaturesDict`.

One `tf.train.Example` per clip: the frozen encoders' outputs (CLIP, Synchformer, CLIP text,
optionally Perception Encoder tokens) and the per-ear VAE posterior (mean, std) of its binaural audio,
so training never runs an encoder. Evaluation sets may add the waveform, synthetic sets the true
source direction per video frame. A `ShardSpec` fixes which fields exist and their shapes; it is
written as `spec.json` beside the shards, and all of a directory's splits share it (an evaluation set
with audio lives in a directory of its own).

Arrays are stored as raw bytes (`Tensor(encoding='bytes')`, native order, i.e. little-endian on
every platform JAX runs on): no float32 widening of half precision as a `float_list` would do, one
`np.frombuffer` to decode, and tf.data can still read them (`tf.io.decode_raw`). `storage_dtype`
applies to the features and latents, the bulk of a shard; tfds handles float16 and bfloat16
(ml_dtypes) natively in this encoding. Waveforms and metadata stay float32. Decoding always returns
float32.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import tensorflow_datasets as tfds
from google.protobuf import message
from tensorflow_datasets.core import example_parser, example_serializer

from visaudio_jax import files
from visaudio_jax.model.config import NetworkConfig
from visaudio_jax.model.network import feature_shapes

__all__ = ['STORAGE_DTYPES', 'SPEC_FILE', 'ShardSpec', 'features', 'encode_example', 'decode_example',
           'write_spec', 'read_spec']

STORAGE_DTYPES = {'float32': np.dtype(np.float32), 'float16': np.dtype(np.float16),
                  'bfloat16': np.dtype(ml_dtypes.bfloat16)}
SPEC_FILE = 'spec.json'
_SPEC_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class ShardSpec:
  """Which fields a dataset's examples hold, and their shapes (per example, no batch axis)."""
  clip_f: tuple[int, int]  # (T_clip, D_clip)
  sync_f: tuple[int, int]  # (T_sync, D_sync)
  text_f: tuple[int, int]  # (L, D_text)
  latent: tuple[int, int, int]  # (ears, N, C) of latent_mean and latent_std
  pe_f: tuple[int, int, int, int] | None = None  # (T_pe, gh, gw, D_pe)
  audio: tuple[int, int] | None = None  # (ears, samples), with `sample_rate`
  metadata_frames: int | None = None  # T_meta of `source_azimuth_deg`
  camera_yaw: bool = False  # also `camera_yaw_deg` (T_meta,)
  storage_dtype: str = 'float32'

  def __post_init__(self):
    for name in ('clip_f', 'sync_f', 'text_f', 'latent', 'pe_f', 'audio'):
      shape = getattr(self, name)
      if shape is not None:
        if not all(isinstance(d, int) and d > 0 for d in shape):
          raise ValueError(f'ShardSpec.{name}: dimensions must be positive ints, got {shape!r}')
        object.__setattr__(self, name, tuple(shape))  # JSON gives lists
    if self.storage_dtype not in STORAGE_DTYPES:
      raise ValueError(f'ShardSpec.storage_dtype must be one of {sorted(STORAGE_DTYPES)}, '
                       f'got {self.storage_dtype!r}')
    if self.metadata_frames is not None and self.metadata_frames < 1:
      raise ValueError(f'ShardSpec.metadata_frames must be >= 1, got {self.metadata_frames}')
    if self.camera_yaw and self.metadata_frames is None:
      raise ValueError('ShardSpec.camera_yaw needs metadata_frames (the per-frame metadata length)')

  @classmethod
  def from_network(cls, cfg: NetworkConfig, *, with_pe: bool | None = None, with_audio: bool = False,
                   with_metadata: bool = False, camera_yaw: bool = False, metadata_frames: int | None = None,
                   storage_dtype: str = 'float32') -> ShardSpec:
    """The shapes the network takes (`feature_shapes`). PE tokens are stored when the spacetime
    module is enabled unless `with_pe` says otherwise; metadata is per CLIP frame unless
    `metadata_frames` is given."""
    shapes, lens, st = feature_shapes(cfg), cfg.seq_lens(), cfg.spacetime
    with_pe = st.enabled if with_pe is None else with_pe
    return cls(
        clip_f=shapes['clip_f'], sync_f=shapes['sync_f'], text_f=shapes['text_f'], latent=shapes['latent'],
        pe_f=(lens.pe, st.grid_h, st.grid_w, st.pe_dim) if with_pe else None,
        audio=(cfg.channels, lens.audio_samples) if with_audio else None,
        metadata_frames=(metadata_frames or lens.clip) if with_metadata else None,
        camera_yaw=camera_yaw, storage_dtype=storage_dtype)

  def to_json(self) -> str:
    return json.dumps({'format': _SPEC_FORMAT, **dataclasses.asdict(self)}, indent=1)

  @classmethod
  def from_json(cls, text: str, where: str = 'spec') -> ShardSpec:
    data = json.loads(text)
    if data.pop('format', None) != _SPEC_FORMAT:
      raise ValueError(f'{where}: not a ShardSpec of format {_SPEC_FORMAT}')
    known = {f.name for f in dataclasses.fields(cls)}
    if set(data) - known:
      raise ValueError(f'{where}: unknown ShardSpec fields {sorted(set(data) - known)}')
    return cls(**data)


@functools.lru_cache(maxsize=16)
def features(spec: ShardSpec) -> tfds.features.FeaturesDict:
  """The one declaration of the example; each doc names the dimensions for error messages."""
  store = STORAGE_DTYPES[spec.storage_dtype]

  def array(shape, dtype, doc):
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding='bytes', doc=doc)

  fields = {
      'id': tfds.features.Text(doc='clip id, unique within the dataset'),
      'caption': tfds.features.Text(doc='caption (may be empty)'),
      'duration_s': tfds.features.Scalar(np.float32, doc='clip duration in seconds'),
      'clip_f': array(spec.clip_f, store, '(T_clip, D_clip) CLIP image features'),
      'sync_f': array(spec.sync_f, store, '(T_sync, D_sync) Synchformer features'),
      'text_f': array(spec.text_f, store, '(L, D_text) CLIP text features'),
      'latent_mean': array(spec.latent, store, '(ears, N, C) VAE posterior mean per ear'),
      'latent_std': array(spec.latent, store, '(ears, N, C) VAE posterior std per ear'),
  }
  if spec.pe_f:
    fields['pe_f'] = array(spec.pe_f, store, '(T_pe, gh, gw, D_pe) Perception Encoder spatial tokens')
  if spec.audio:
    fields['audio'] = array(spec.audio, np.float32, '(ears, samples) waveform in [-1, 1]')
    fields['sample_rate'] = tfds.features.Scalar(np.int32, doc='waveform sample rate in Hz')
  if spec.metadata_frames:
    fields['source_azimuth_deg'] = array((spec.metadata_frames,), np.float32,
                                         '(T_meta,) true source azimuth per frame, degrees')
  if spec.camera_yaw:
    fields['camera_yaw_deg'] = array((spec.metadata_frames,), np.float32, '(T_meta,) camera yaw per frame, degrees')
  return tfds.features.FeaturesDict(fields)


@functools.lru_cache(maxsize=16)
def _codecs(spec: ShardSpec):
  info = features(spec).get_serialized_info()
  return example_serializer.ExampleSerializer(info), example_parser.ExampleParserNp(info)


def _check(spec: ShardSpec, example: Mapping[str, Any]) -> dict[str, Any]:
  """The example in the storage dtypes, or a ValueError naming the field that does not fit."""
  feats = features(spec)
  missing, extra = set(feats.keys()) - set(example), set(example) - set(feats.keys())
  if missing or extra:
    raise ValueError(f'example {example.get("id")!r} does not fit the ShardSpec: missing fields '
                     f'{sorted(missing)}, unexpected fields {sorted(extra)}')
  out = {}
  for name, feat in feats.items():
    value = example[name]
    if isinstance(feat, tfds.features.Text):
      if not isinstance(value, str):
        raise ValueError(f'{name}: expected a str, got {type(value).__name__}')
      out[name] = value
      continue
    where, dtype = f'{name} of example {example["id"]!r}', np.dtype(feat.np_dtype)
    x = np.asarray(value)
    if x.shape != feat.shape:
      raise ValueError(f'{where}: expected shape {feat.shape} {feat.doc.desc}, got {x.shape}')
    if x.dtype.kind not in 'fiu' and x.dtype != STORAGE_DTYPES['bfloat16']:
      raise ValueError(f'{where}: expected numbers, got dtype {x.dtype}')
    with np.errstate(over='ignore'):  # overflow is reported below
      stored = x.astype(dtype)
    if dtype.kind == 'i':
      if not np.array_equal(stored, x):
        raise ValueError(f'{where}: {x} is not a {dtype.name}')
    elif not np.isfinite(x).all():
      raise ValueError(f'{where}: non-finite values')
    elif not np.isfinite(stored).all():
      raise ValueError(f'{where}: values beyond the range of {dtype.name} storage')
    out[name] = stored
  return out


def encode_example(spec: ShardSpec, example: Mapping[str, Any]) -> bytes:
  """A clip dict -> serialized `tf.train.Example`, byte-for-byte deterministic (sorted map keys)."""
  serializer, _ = _codecs(spec)
  proto = serializer.get_tf_example(features(spec).encode_example(_check(spec, example)))
  return proto.SerializeToString(deterministic=True)


def decode_example(spec: ShardSpec, data: bytes) -> dict[str, Any]:
  """Serialized example -> dict of fresh numpy arrays: float32 whatever the storage dtype, scalars
  0-d (float32 duration, int32 sample rate); text as str."""
  _, parser = _codecs(spec)
  try:
    parsed = parser.parse_example(data)
  except message.DecodeError as err:
    raise ValueError(f'not a serialized tf.train.Example ({err})') from None
  feats = features(spec)
  missing = sorted(k for k in feats.keys() if parsed.get(k) is None)
  if missing:
    raise ValueError(f'example {parsed.get("id")!r} lacks fields {missing} of the ShardSpec '
                     '(written with another spec?)')
  out = {}
  for name, feat in feats.items():
    if isinstance(feat, tfds.features.Text):
      out[name] = parsed[name].decode('utf-8')
      continue
    try:
      value = feat.decode_example_np(parsed[name])
    except ValueError as err:
      raise ValueError(f'{name} of example {out.get("id")!r}: stored data does not fit shape {feat.shape} '
                       f'{feat.np_dtype.name} {feat.doc.desc} ({err})') from None
    out[name] = np.array(value, np.int32 if np.dtype(feat.np_dtype).kind == 'i' else np.float32)
  return out


def write_spec(directory: str | os.PathLike, spec: ShardSpec) -> None:
  """`<directory>/spec.json`, atomically."""
  Path(directory).mkdir(parents=True, exist_ok=True)
  files.write_bytes(Path(directory) / SPEC_FILE, spec.to_json().encode(), durable=True)


def read_spec(directory: str | os.PathLike) -> ShardSpec:
  path = Path(directory) / SPEC_FILE
  try:
    text = path.read_text()
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: no ShardSpec here; is {os.fspath(directory)} a shard directory?') from None
  return ShardSpec.from_json(text, os.fspath(path))
