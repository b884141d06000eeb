"""Data-loader throughput per host: full-size examples (default large_44k binaural with PE tokens)
written to TFRecord shards, then read through the Grain pipeline (global shuffle, decode, batch)
with 0 (in-process), 1, 2 and N worker processes.

  python bench/loader.py                                    # 32 examples, float16 storage
  python bench/loader.py --examples=128 --storage_dtype=float32 --workers=0,4,8

Prints a table and writes JSON (default bench/results/loader_<host>.json). Example values are random;
only sizes matter. The shards go to a temporary folder (or --dir, reused when present).
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import tempfile
import time

import numpy as np
from absl import app, flags

import configs
from visaudio_jax.data import loader, schema, shards
from visaudio_jax.model.config import network_config

_PRESET = flags.DEFINE_string('preset', 'large_44k', 'Model preset whose feature shapes the examples take.')
_EXAMPLES = flags.DEFINE_integer('examples', 32, 'Examples written.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Per-host batch size.')
_BATCHES = flags.DEFINE_integer('batches', 12, 'Batches timed per setting (after 2 warm-up batches).')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2', str(os.cpu_count())], 'Worker counts to measure.')
_DTYPE = flags.DEFINE_enum('storage_dtype', 'float16', ['float32', 'float16', 'bfloat16'], 'Stored dtype.')
_DIR = flags.DEFINE_string('dir', None, 'Shard folder (default: a temporary folder).')
_OUT = flags.DEFINE_string('out', None, 'JSON path (default bench/results/loader_<host>.json).')


def _random_example(spec: schema.ShardSpec, i: int, rng: np.random.Generator) -> dict:
  arrays = {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in (('clip_f', spec.clip_f), ('sync_f', spec.sync_f), ('text_f', spec.text_f),
                                ('latent_mean', spec.latent), ('latent_std', spec.latent))}
  if spec.pe_f:
    arrays['pe_f'] = rng.standard_normal(spec.pe_f).astype(np.float32)
  return {'id': f'clip_{i:06d}', 'caption': 'a synthetic caption', 'duration_s': np.float32(8.0), **arrays}


def main(argv):
  del argv
  cfg = network_config(configs.get_config(_PRESET.value).model)
  spec = schema.ShardSpec.from_network(cfg, storage_dtype=_DTYPE.value)
  folder = pathlib.Path(_DIR.value or tempfile.mkdtemp(prefix='loader_bench_'))
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  shards.write_split(folder, 'train', spec, lambda i: _random_example(spec, i, rng), _EXAMPLES.value,
                     examples_per_shard=max(1, _EXAMPLES.value // 4))
  write_s = time.perf_counter() - start
  disk = sum(p.stat().st_size for p in folder.glob('train-*.tfrecord'))
  per_example_mb = disk / _EXAMPLES.value / 2**20
  rows = []
  print(f'host {socket.gethostname()} ({os.cpu_count()} CPUs), preset {_PRESET.value}, storage {_DTYPE.value}: '
        f'{per_example_mb:.2f} MB per example on disk, {_EXAMPLES.value} examples written in {write_s:.1f} s')
  cols = ['workers', 'examples_per_s', 'mb_per_s', 'first_batch_s']
  print(' | '.join(f'{c:>14}' for c in cols), flush=True)
  for workers in map(int, _WORKERS.value):
    ds = loader.make_dataset(folder, 'train', spec, global_batch=_BATCH.value, seed=0, worker_count=workers,
                             process_index=0, process_count=1)
    it = iter(ds)
    start = time.perf_counter()
    next(it)
    first_s = time.perf_counter() - start
    next(it)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
      next(it)
    seconds = time.perf_counter() - start
    examples = _BATCHES.value * _BATCH.value
    rows.append({'workers': workers, 'examples_per_s': examples / seconds,
                 'mb_per_s': examples * per_example_mb / seconds, 'first_batch_s': first_s})
    print(' | '.join(f'{rows[-1][c]:>14.2f}' if isinstance(rows[-1][c], float) else f'{rows[-1][c]:>14}'
                     for c in cols), flush=True)
    del it, ds
  out = pathlib.Path(_OUT.value or f'bench/results/loader_{socket.gethostname()}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'preset': _PRESET.value, 'storage_dtype': _DTYPE.value, 'batch': _BATCH.value,
                             'mb_per_example': per_example_mb, 'cpus': os.cpu_count(), 'rows': rows}, indent=2))
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
