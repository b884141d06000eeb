"""Ahead-of-time compilation of the sharded train step for a TPU topology, on a CPU host.

  python -m visaudio_jax.tools.aot --config=configs/large.py --topology=v5p:4x4x4
  python -m visaudio_jax.tools.aot --config=configs/large.py --topology=v5p:2x2x2 --topology=v5p:8x8x4 \
      --json=bench/results/aot_large.json
  python -m visaudio_jax.tools.aot --config=configs/medium_44k.py:bf16,remat --topology=v5e:4x4 --per_chip_batch=4

As MaxText's train_compile: `jax.experimental.topologies.get_topology_desc` with the `libtpu` wheel
(`pip install "libtpu==0.0.42.*"`, the version jax 0.10.2's `tpu` extra pins; listed in
requirements-test.txt) gives compile-only TPU devices; the config's mesh is built over them, and the
same jitted step `train.py` runs is lowered with the abstract sharded state and batch and compiled by
the TPU compiler. Nothing is allocated or run. Prints, per chip: XLA's memory plan (arguments =
sharded state + batch shard, outputs, aliased (donated) bytes, temporaries, generated code; total =
argument + output - alias + temp + code) against the chip's HBM, and XLA's FLOP estimate beside the
analytic model FLOPs (`train/metrics.py`; remat recomputes the forward pass, so XLA's count is
~4/3 of the analytic one with full remat).

Topologies are '<chip>:<A>x<B>[x<C>]' with chip v4, v5p, v5e or v6e (e.g. v5p:4x4x4 = 64 chips,
v5e:16x16 = 256 chips). The global batch is the config's (`train.global_batch_size`) unless
--global_batch or --per_chip_batch says otherwise; it must divide over the mesh's data x fsdp chips.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import pathlib
import re
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from visaudio_jax import tools
from visaudio_jax.model import sharding
from visaudio_jax.train import metrics, state, trainer

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  libtpu_name: str  # the generation prefix libtpu's topology names use
  chip_config_name: str  # 'megacore': one JAX device per chip (two TensorCores)
  hbm_bytes: int
  dims: int  # 3 for the 3-D torus generations, 2 for the lite pods
  device_kind: str  # `device.device_kind` of the compile-only devices (metrics.PEAK_BF16_FLOPS key)


CHIPS = {
    'v4': Chip('v4', 'megacore', 32 * GiB, 3, 'TPU v4'),
    'v5p': Chip('v5', 'megacore', 95 * GiB, 3, 'TPU v5'),
    'v5e': Chip('v5e', 'default', 16 * GiB, 2, 'TPU v5 lite'),
    'v6e': Chip('v6e', 'default', 32 * GiB, 2, 'TPU v6 lite'),
}


def parse_topology(topology: str) -> tuple[Chip, tuple[int, ...]]:
  m = re.fullmatch(r'(v4|v5p|v5e|v6e):(\d+(?:x\d+)*)', topology.strip())
  if not m:
    raise ValueError(f'topology {topology!r}: expected <chip>:<A>x<B>[x<C>] with chip in {sorted(CHIPS)}, '
                     'e.g. v5p:4x4x4 or v5e:4x8')
  chip = CHIPS[m.group(1)]
  dims = tuple(int(d) for d in m.group(2).split('x'))
  if len(dims) != chip.dims or min(dims) < 1:
    raise ValueError(f'topology {topology!r}: {m.group(1)} slices have {chip.dims} dimensions')
  return chip, dims


def _wrap(chip: Chip, dims: tuple[int, ...]) -> tuple[bool, bool, bool]:
  """Torus wrap-around links (MaxText's accelerator table): 3-D generations are tori from 4x4x4 up;
  the lite pods wrap a dimension of 16 chips."""
  if chip.dims == 3:
    return (min(dims) >= 4,) * 3
  return tuple(d == 16 for d in dims) + (False,)


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """Compile-only TPU devices of `num_slices` slices of `topology` (needs the libtpu wheel)."""
  chip, dims = parse_topology(topology)
  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    raise RuntimeError('AOT compilation for TPUs needs the libtpu wheel: pip install "libtpu==0.0.42.*" '
                       '(jax 0.10.2\'s tpu extra; see requirements-test.txt)') from e
  from jax.experimental import topologies
  # libtpu complains at load time about a missing TPU worker list on a host without TPUs, and takes a
  # lock file meant for processes that drive TPUs; compile-only devices need neither.
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  name = f'{chip.libtpu_name}:' + 'x'.join(map(str, dims))
  host = tuple(min(d, 2) for d in dims[:2]) + (1,)
  devices = topologies.get_topology_desc(
      name, platform='tpu', chip_config_name=chip.chip_config_name, chips_per_host_bounds=host,
      num_slices=num_slices, wrap=_wrap(chip, dims)).devices
  expected = math.prod(dims) * num_slices
  if len(devices) != expected:
    raise RuntimeError(f'{topology}: libtpu gave {len(devices)} devices, expected {expected} (one per chip)')
  return list(devices)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`configs/<name>.py[:arg]` as `ml_collections.config_flags` loads it (its `get_config(arg)`)."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location(f'_aot_config_{pathlib.Path(path).stem}', path)
  if module_spec is None or not os.path.exists(path):
    raise FileNotFoundError(f'no config file {path}')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _shard_bytes(tree) -> int:
  """Bytes one device holds of ShapeDtypeStructs carrying NamedShardings (max over devices)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
  return total


def check_state_splits(target, mesh: jax.sharding.Mesh, where: str, torus: tuple[int, ...] | None = None) -> None:
  """Every sharded state dimension must divide by its mesh axes (else jit fails deep inside with an
  IndivisibleError naming no parameter). Suggests the largest 'fsdp' size that works; on a TPU
  `torus` (its chip dimensions) one that is a product of some of them, as jax.make_mesh requires."""
  bad, fsdp_dims = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    for dim, axes in zip(leaf.shape, leaf.sharding.spec):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      if 'fsdp' in axes:
        fsdp_dims.append(dim // math.prod(mesh.shape[a] for a in axes if a != 'fsdp'))
      if dim % math.prod(mesh.shape[a] for a in axes):
        bad.append(f'{jax.tree_util.keystr(path)} {leaf.shape} over {axes}')
  if not bad:
    return
  n = math.prod(mesh.shape.values())
  hint = ''
  if fsdp_dims:
    fsdp = math.gcd(n // mesh.shape['tensor'], *fsdp_dims)
    if torus and mesh.shape['tensor'] == 1:  # fsdp and data each a product of torus dimensions
      subsets = itertools.chain.from_iterable(itertools.combinations(torus, k) for k in range(len(torus) + 1))
      fsdp = max(p for p in map(math.prod, subsets) if fsdp % p == 0)
    data = n // (fsdp * mesh.shape['tensor'])
    rule = ' and is a product of torus dimensions' if torus else ''
    hint = (f'; e.g. --config.mesh.shape="({data},{fsdp},{mesh.shape["tensor"]})" (data x fsdp x tensor: the '
            f'largest fsdp that divides every sharded dimension{rule})')
  raise ValueError(f'{where}: {len(bad)} state arrays do not split evenly over mesh {dict(mesh.shape)}, e.g. '
                   f'{"; ".join(bad[:3])}{hint}')


def compile_for_topology(config: ml_collections.ConfigDict, topology: str, global_batch: int | None = None,
                         *, per_chip_batch: int | None = None, num_slices: int = 1) -> dict[str, Any]:
  """Lower and compile the sharded train step for `topology`; XLA's per-chip memory plan and FLOPs.

  The batch defaults to the config's `train.global_batch_size`; `per_chip_batch` sets it to that
  many examples per data x fsdp chip. Raises ValueError when the batch does not split over the mesh.
  """
  if global_batch is not None and per_chip_batch is not None:
    raise ValueError('give global_batch or per_chip_batch, not both')
  chip, dims = parse_topology(topology)
  devices = topology_devices(topology, num_slices)
  try:
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices=devices)
  except (ValueError, NotImplementedError) as e:  # NotImplementedError: no layout on the torus
    raise ValueError(f'{topology}: mesh {tuple(config.mesh.shape)} does not fit {len(devices)} chips laid out '
                     f'{"x".join(map(str, dims))} (each mesh axis must be a product of torus dimensions): {e}') from e
  batch_chips = mesh.shape['data'] * mesh.shape['fsdp']
  config = config.copy_and_resolve_references()
  if per_chip_batch is not None:
    global_batch = per_chip_batch * batch_chips
  if global_batch is not None:
    config.train.global_batch_size = int(global_batch)
  batch = int(config.train.global_batch_size)
  try:
    state.check_batch_fits_mesh(batch, mesh, int(config.train.grad_accum_steps))
  except ValueError as e:
    raise ValueError(f'{topology} ({len(devices)} chips, mesh {dict(mesh.shape)}): {e}') from e

  program = trainer.build(config, mesh)
  target, abstract_batch = program.restore_target(), program.abstract_batch()
  check_state_splits(target, mesh, f'{topology} ({len(devices)} chips)',
                     dims if num_slices == 1 else None)
  start = time.perf_counter()
  with jax.set_mesh(program.mesh), nn.logical_axis_rules([tuple(r) for r in config.logical_axis_rules]):
    lowered = program.jitted_step.lower(target, abstract_batch)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s

  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  n = len(devices)
  analytic = metrics.train_flops_per_example(program.net) * batch / n
  xla_flops = float(cost.get('flops', float('nan')))
  out = {
      'topology': topology, 'num_slices': num_slices, 'chips': n, 'device_kind': devices[0].device_kind,
      'mesh': dict(mesh.shape), 'global_batch': batch, 'per_chip_batch': batch / batch_chips,
      'preset': config.preset, 'dtype': program.net.dtype, 'remat_policy': program.net.remat_policy,
      'scan_layers': program.net.scan_layers, 'grad_accum_steps': int(config.train.grad_accum_steps),
      'params': sum(math.prod(x.shape) for x in jax.tree.leaves(program.abstract_state.params)),
      'state_bytes_per_chip': _shard_bytes(target), 'batch_bytes_per_chip': _shard_bytes(abstract_batch),
      'argument_bytes': mem.argument_size_in_bytes, 'output_bytes': mem.output_size_in_bytes,
      'alias_bytes': mem.alias_size_in_bytes, 'temp_bytes': mem.temp_size_in_bytes,
      'generated_code_bytes': mem.generated_code_size_in_bytes,
      'hbm_bytes': chip.hbm_bytes,
      'xla_flops_per_chip': xla_flops, 'analytic_flops_per_chip': analytic,
      'lower_s': lower_s, 'compile_s': compile_s,
  }
  out['total_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes'] + out['temp_bytes']
                        + out['generated_code_bytes'])
  out['hbm_fraction'] = out['total_bytes'] / chip.hbm_bytes
  out['fits'] = out['total_bytes'] <= chip.hbm_bytes
  out['xla_over_analytic'] = xla_flops / analytic if analytic else float('nan')
  peak = metrics.PEAK_BF16_FLOPS.get(chip.device_kind)
  if peak:  # the step time at 100 % MFU: a floor, for scale
    out['step_s_at_peak'] = analytic / peak
  return out


COLUMNS = (('topology', 'topology', '{}'), ('chips', 'chips', '{}'), ('batch/chip', 'per_chip_batch', '{:g}'),
           ('state', 'state_bytes_per_chip', 'gib'), ('argument', 'argument_bytes', 'gib'),
           ('output', 'output_bytes', 'gib'), ('alias', 'alias_bytes', 'gib'), ('temp', 'temp_bytes', 'gib'),
           ('code', 'generated_code_bytes', 'gib'), ('total', 'total_bytes', 'gib'), ('HBM', 'hbm_bytes', 'gib'),
           ('used', 'hbm_fraction', '{:.0%}'), ('XLA TFLOP', 'xla_flops_per_chip', 'tflop'),
           ('model TFLOP', 'analytic_flops_per_chip', 'tflop'), ('ratio', 'xla_over_analytic', '{:.2f}'),
           ('compile s', 'compile_s', '{:.0f}'))


def format_table(rows: list[dict]) -> str:
  """Per-chip memory (GiB) and FLOPs (TFLOP per step) of each compiled topology."""
  def cell(row, key, fmt):
    v = row[key]
    if fmt == 'gib':
      return f'{v / GiB:.2f}'
    if fmt == 'tflop':
      return f'{v / 1e12:.2f}'
    return fmt.format(v)

  table = [[c[0] for c in COLUMNS]] + [[cell(r, key, fmt) for _, key, fmt in COLUMNS] for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
  return '\n'.join(' | '.join(v.rjust(w) for v, w in zip(line, widths)) for line in table)


def main(argv):
  del argv
  from absl import flags

  FLAGS = flags.FLAGS
  config = FLAGS.config
  rows = []
  for topology in FLAGS.topology:
    row = compile_for_topology(config, topology, FLAGS.global_batch, per_chip_batch=FLAGS.per_chip_batch,
                               num_slices=FLAGS.num_slices)
    rows.append(row)
    print(f'{topology}: {row["chips"]} x {row["device_kind"]}, mesh {row["mesh"]}, global batch '
          f'{row["global_batch"]}, {row["preset"]} {row["dtype"]} remat={row["remat_policy"]} '
          f'scan={row["scan_layers"]}, {row["params"] / 1e6:.0f} M params; lowered in {row["lower_s"]:.0f} s, '
          f'compiled in {row["compile_s"]:.0f} s', flush=True)
  print('\nper chip: memory in GiB (total = argument + output - alias + temp + code), FLOPs per step')
  print(format_table(rows))
  for r in rows:
    verdict = ('fits' if r['hbm_fraction'] <= 0.9 else 'fits, under 10 % headroom') if r['fits'] else 'DOES NOT FIT'
    print(f'{r["topology"]}: {verdict} ({r["total_bytes"] / GiB:.1f} of {r["hbm_bytes"] / GiB:.0f} GiB)')
  if FLAGS.json:
    path = pathlib.Path(FLAGS.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'jax': jax.__version__, 'config': FLAGS['config'].config_filename,
                                'rows': rows}, indent=1))
    print(f'wrote {path}')


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', 'configs/large.py', 'Experiment config file (configs/*.py[:flags]).')
  flags.DEFINE_multi_string('topology', ['v5p:4x4x4'], 'TPU slice, e.g. v5p:2x2x2, v5e:4x8, v6e:16x16.')
  flags.DEFINE_integer('num_slices', 1, 'Slices (multi-slice over DCN); the mesh spans all their chips.')
  flags.DEFINE_integer('global_batch', None, 'Global batch (default: the config\'s train.global_batch_size).')
  flags.DEFINE_integer('per_chip_batch', None, 'Examples per data x fsdp chip (sets the global batch).')
  flags.DEFINE_string('json', None, 'Also write the rows as JSON here.')


if __name__ == '__main__':
  tools.run_on_host_cpu(main, _define_flags)
