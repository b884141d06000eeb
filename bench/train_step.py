"""Training-step speed and memory: the real jitted, sharded, state-donating train step of `train.py`
on random batches, per config and remat/scan/bf16 variant, at a given per-device batch.

  python bench/train_step.py                                          # tiny, every variant
  python bench/train_step.py --configs=small_16k --variants=none --per_device_batch=1 --steps=2
  python bench/train_step.py --configs=large_44k --variants=bf16+remat,bf16+scan+remat,bf16 \
      --per_device_batch=8                                            # on an H200 (goal: MFU >= 50 %)

Configs are configs/<name>.py (tiny, small_16k, small_44k, medium_44k, large_44k, large, ...); a
variant is '+'-joined config flags (none, remat, scan, bf16, cudnn: see configs/common.py FLAGS), appended to
the config file's own (configs/large.py is already bf16+remat). The global batch is
per_device_batch x the mesh's data x fsdp devices (default per-device batch: the config's).

Per row: compile time; median step time over --steps steps after one warm-up step; examples/s,
audio-seconds/s; model TFLOP/s per device (analytic FLOPs, visaudio_jax/train/metrics.py) and MFU
where the device's bf16 peak is in metrics.PEAK_BF16_FLOPS (else none, not a guess); peak device
memory from the device's memory_stats where the backend has them (GPU, TPU), else XLA's plan
(argument + output - alias + temp). Prints a table and writes JSON
(default bench/results/train_step_<platform>.json). A row that fails (e.g. out of memory) is
recorded with its error and the sweep goes on.
"""
from __future__ import annotations

import json
import math
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from visaudio_jax.model import sharding
from visaudio_jax.tools.aot import load_config
from visaudio_jax.train import metrics, trainer
from visaudio_jax.train import state as state_lib

_CONFIGS = flags.DEFINE_list('configs', ['tiny'], 'Config files configs/<name>.py to measure.')
_VARIANTS = flags.DEFINE_list('variants', ['none', 'remat', 'scan', 'scan+remat', 'bf16', 'bf16+scan+remat'],
                              "'+'-joined config flags per variant; 'none' = the config as it is.")
_PER_DEVICE_BATCH = flags.DEFINE_integer('per_device_batch', None,
                                         "Examples per data x fsdp device (default: the config's batch).")
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps after one warm-up step.')
_OUT = flags.DEFINE_string('json', None, 'JSON path (default bench/results/train_step_<platform>.json).')

GiB = 2**30


def _config(name: str, variant: str):
  flags_ = ','.join(f for f in variant.split('+') if f and f != 'none')
  path = pathlib.Path(__file__).resolve().parents[1] / 'configs' / f'{name}.py'
  return load_config(f'{path}:{flags_}' if flags_ else str(path))


def _random_batch(program: trainer.Program, seed: int = 0) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  out = {}
  for k, s in program.abstract_batch().items():
    x = rng.standard_normal(s.shape, dtype=np.float32)
    out[k] = jax.device_put(np.abs(x) * 0.1 + 0.01 if k == 'latent_std' else x, program.batch_sharding)
  return out


def _planned_bytes(compiled) -> float | None:
  m = compiled.memory_analysis()
  if m is None:
    return None
  return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def measure(name: str, variant: str) -> dict:
  config = _config(name, variant)
  mesh_probe = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  batch_devices = mesh_probe.shape['data'] * mesh_probe.shape['fsdp']
  per_device = _PER_DEVICE_BATCH.value or max(1, int(config.train.global_batch_size) // batch_devices)
  config.train.global_batch_size = per_device * batch_devices
  program = trainer.build(config, mesh_probe)
  cfg, global_batch = program.net, int(config.train.global_batch_size)
  row = {'config': name, 'variant': variant, 'preset': config.preset, 'dtype': cfg.dtype,
         'remat_policy': cfg.remat_policy, 'scan_layers': cfg.scan_layers, 'attention_impl': cfg.attention_impl,
         'mesh': dict(program.mesh.shape), 'per_device_batch': per_device, 'global_batch': global_batch,
         'params_M': sum(math.prod(x.shape) for x in jax.tree.leaves(program.abstract_state.params)) / 1e6}
  state = state_lib.create_state(cfg, config, program.tx, program.shardings, program.mesh)
  batch = _random_batch(program)
  start = time.perf_counter()
  with jax.set_mesh(program.mesh), nn.logical_axis_rules([tuple(r) for r in config.logical_axis_rules]):
    compiled = program.jitted_step.lower(state, batch).compile()
  row['compile_s'] = time.perf_counter() - start
  state, step_metrics = compiled(state, batch)  # warm-up
  losses = [float(step_metrics['loss'])]
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, step_metrics = compiled(state, batch)
    jax.block_until_ready((state, step_metrics))
    times.append(time.perf_counter() - start)
    losses.append(float(step_metrics['loss']))
  step_s = statistics.median(times)
  row.update(step_s=step_s, step_times_s=times, losses=losses, loss_finite=bool(np.all(np.isfinite(losses))))
  row.update(metrics.throughput(cfg, global_batch, step_s, cfg.duration_s))
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    row.update(peak_mem_gib=stats['peak_bytes_in_use'] / GiB, mem_source='device memory_stats')
  else:
    planned = _planned_bytes(compiled)
    row.update(peak_mem_gib=planned / GiB if planned is not None else float('nan'), mem_source='XLA plan')
  row['xla_tflop_per_device'] = float((compiled.cost_analysis() or {}).get('flops', float('nan'))) / 1e12
  del state, batch, compiled
  return row


COLUMNS = (('config', 'config', '{}'), ('variant', 'variant', '{}'), ('batch/dev', 'per_device_batch', '{}'),
           ('compile s', 'compile_s', '{:.1f}'), ('step ms', 'step_s', 'ms'), ('ex/s', 'examples_per_s', '{:.2f}'),
           ('audio s/s', 'audio_seconds_per_s', '{:.1f}'), ('TFLOP/s/dev', 'tflops_per_device', '{:.3f}'),
           ('MFU', 'mfu', '{:.1%}'), ('peak GiB', 'peak_mem_gib', '{:.2f}'))


def _cell(row, key, fmt):
  if 'error' in row and key not in row:
    return '-'
  v = row.get(key)
  if v is None:
    return '-'
  return f'{v * 1e3:.1f}' if fmt == 'ms' else fmt.format(v)


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f'device: {jax.device_count()} x {device.device_kind} ({device.platform}), jax {jax.__version__}, '
        f'bf16 peak {metrics.peak_flops(device) or "unknown"}', flush=True)
  rows = []
  for name in _CONFIGS.value:
    for variant in _VARIANTS.value:
      try:
        row = measure(name, variant)
      except Exception as e:  # noqa: BLE001 (an OOM in one variant must not end the sweep)
        row = {'config': name, 'variant': variant, 'error': f'{type(e).__name__}: {str(e)[:500]}'}
        print(f'{name} {variant}: FAILED {row["error"]}', flush=True)
      else:
        print(f'{name} {variant}: {row["step_s"] * 1e3:.1f} ms/step, losses {row["losses"][0]:.4f} -> '
              f'{row["losses"][-1]:.4f}', flush=True)
      rows.append(row)
      jax.clear_caches()
  table = [[c[0] for c in COLUMNS]] + [[_cell(r, key, fmt) for _, key, fmt in COLUMNS] for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
  print('\n'.join(' | '.join(v.rjust(w) for v, w in zip(line, widths)) for line in table))
  mem = {r.get('mem_source') for r in rows} - {None}
  print(f'peak memory: {", ".join(sorted(mem)) or "-"}; FLOPs analytic (3 x forward per example)')
  out = pathlib.Path(_OUT.value or f'bench/results/train_step_{device.platform}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'device': device.device_kind, 'platform': device.platform,
                             'device_count': jax.device_count(), 'jax': jax.__version__, 'rows': rows}, indent=2))
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
