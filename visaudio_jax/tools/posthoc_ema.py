"""Post-hoc EMA (EDM2, Karras et al. 2024): the power-function EMA of any sigma_rel, synthesised after
training from the power EMAs a run's checkpoints hold, written as a params-only run checkpoint.

  python -m visaudio_jax.tools.posthoc_ema --workdir=runs/large --sigma_rel=0.07 --out=runs/large_ema0p07
  python -m visaudio_jax.tools.posthoc_ema --workdir=runs/large --sigma_rel=0.05 --step=200000 --out=...

Every kept checkpoint step S holds one snapshot of each power EMA of the run's config
(`ema.sigma_rels`; the fixed-decay `ema.decays` EMAs are no power EMAs and are ignored). A state saved
at step S has done S optimiser updates, so its EMAs have seen `optim.ema_count(S - 1)` = S - ema.start
updates: that is the snapshot's time (checkpoints from before the EMAs started have none). The
target is the EMA at the last checkpoint used (`--step`, default the latest): weights by
`optim.solve_posthoc_weights` over the snapshots up to it, the sum by `optim.synthesize_ema`, one
snapshot restored at a time (Orbax partial restore onto host numpy), so the host holds a few
params-sized arrays whatever the number of checkpoints.

Writes `<out>/checkpoints/<step>/` with items 'state' = {'params': ...} and 'config' (the run's), so
`train.init_from=<out>`, `sample.py --checkpoint=<out> --params=raw` and
`components.restore_run_params(<out>, ...)` read it like a run's latest checkpoint, and `<out>/posthoc.json`: the target, and every snapshot's step, EMA, time, gamma and
weight. An existing non-empty `<out>` is refused unless --overwrite, which replaces those two entries.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from visaudio_jax import tools
from visaudio_jax.files import write_json
from visaudio_jax.train import optim

MIN_SNAPSHOTS = 2  # one snapshot can only be rescaled, not reshaped into another profile


def target_gamma(sigma_rel: float) -> float:
  """The power exponent of `sigma_rel`; power EMAs reach sigma_rel ~0.3003 at most."""
  if not sigma_rel > 0:
    raise ValueError(f'sigma_rel={sigma_rel}: must be positive (e.g. 0.05, MMAudio\'s output EMA)')
  gamma = optim.sigma_rel_to_gamma(sigma_rel)
  reached = np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) if gamma > -1 else np.nan
  if not np.isclose(reached, sigma_rel, rtol=1e-9, atol=0):
    raise ValueError(f'sigma_rel={sigma_rel}: no power-function EMA has it; expected at most ~0.3')
  return gamma


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config train.py stored in `<workdir>/config.json`."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'workdir {workdir!r}: no such directory (expected a train.py run directory)')
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: missing (expected the run config train.py writes into its workdir)')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f)['config'])


def power_emas(ema_cfg: ml_collections.ConfigDict) -> dict[str, tuple[float, float]]:
  """EMA name -> (sigma_rel, gamma) of the run's power EMAs; `ema_profiles` lists them first, in
  `sigma_rels` order."""
  power = [(name, gamma) for name, (kind, gamma) in optim.ema_profiles(ema_cfg).items() if kind == 'power']
  return {name: (float(s), gamma) for (name, gamma), s in zip(power, ema_cfg.sigma_rels)}


def _open_checkpoints(workdir: str) -> ocp.CheckpointManager:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory}: no checkpoints (expected <workdir>/checkpoints/<step>/ from train.py)')
  # PyTreeCheckpointHandler reads what StandardCheckpointHandler wrote and takes partial restores.
  return ocp.CheckpointManager(directory, item_names=('state',),
                               item_handlers={'state': ocp.PyTreeCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(read_only=True))


def _snapshots(manager: ocp.CheckpointManager, steps: list[int], emas: dict[str, tuple[float, float]],
               ema_cfg: ml_collections.ConfigDict) -> tuple[list[dict], list[Any]]:
  """(snapshot records, their stored tree metadata): one per (checkpoint step, power EMA) once the
  EMAs have started."""
  records, metadata = [], []
  for step in steps:
    time = int(optim.ema_count(step - 1, ema_cfg))
    if time < 1:
      logging.info('step %d: the EMAs start after update %d, no snapshot', step, int(ema_cfg.start))
      continue
    stored = manager.item_metadata(step).state.tree.get('ema', {})
    missing = [name for name in emas if name not in stored]
    if missing:
      raise ValueError(f'checkpoint step {step}: no stored EMA {missing} (it holds {sorted(stored)}); the '
                       f'config.json ema.sigma_rels {list(ema_cfg.sigma_rels)} expect one per sigma_rel')
    for name, (sigma_rel, gamma) in emas.items():
      records.append(dict(step=step, ema=name, sigma_rel=sigma_rel, time=time, gamma=gamma))
      metadata.append(stored[name])
  return records, metadata


def _restore_ema(manager: ocp.CheckpointManager, step: int, name: str, metadata: Any) -> Any:
  """Only `state.ema[name]` of checkpoint `step`, as host numpy arrays."""
  target = {'ema': {name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata)}}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True)))
  return restored.state['ema'][name]


def synthesize(workdir: str, sigma_rel: float, step: int | None = None) -> tuple[Any, dict]:
  """(params as numpy, record): the power EMA with `sigma_rel` at checkpoint `step` (default the
  latest) synthesised from the snapshots of the checkpoints up to it."""
  workdir = os.path.abspath(workdir)
  gamma = target_gamma(sigma_rel)
  config = run_config(workdir)
  emas = power_emas(config.ema)
  if not emas:
    raise ValueError(f'{workdir}: the run tracks no power EMA (config.json ema.sigma_rels is empty; '
                     f'ema.decays {list(config.ema.decays)} are fixed-decay EMAs, which cannot be combined)')
  with _open_checkpoints(workdir) as manager:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f'{manager.directory}: no checkpoints (expected <step>/ directories from train.py)')
    step = steps[-1] if step is None else int(step)
    used = [s for s in steps if s <= step]
    if not used or used[-1] != step:
      raise ValueError(f'step={step} is no checkpoint step: the target would be after the last snapshot '
                       f'({used[-1] if used else "none before it"}); expected one of the checkpoint steps {steps}')
    snapshots, metadata = _snapshots(manager, used, emas, config.ema)
    if len(snapshots) < MIN_SNAPSHOTS:
      raise ValueError(f'{workdir}: {len(snapshots)} power-EMA snapshots up to step {step} (checkpoints '
                       f'{used}, EMAs {sorted(emas)}, ema.start {int(config.ema.start)}); need at least '
                       f'{MIN_SNAPSHOTS}: more checkpoints or another sigma_rel tracked')
    time = int(optim.ema_count(step - 1, config.ema))
    weights = optim.solve_posthoc_weights([s['time'] for s in snapshots], [s['gamma'] for s in snapshots],
                                          sigma_rel, time)
    params = None
    for snap, meta, weight in zip(snapshots, metadata, weights):
      # Term by term, as synthesize_ema sums, without holding every snapshot at once.
      term = optim.synthesize_ema([_restore_ema(manager, snap['step'], snap['ema'], meta)], [weight])
      params = term if params is None else jax.tree.map(np.add, params, term)
      snap['weight'] = float(weight)
  record = dict(workdir=workdir, sigma_rel=float(sigma_rel), gamma=gamma, step=step, time=time,
                ema_start=int(config.ema.start), snapshots=snapshots)
  return params, record


def check_out_dir(out_dir: str, overwrite: bool, workdir: str) -> None:
  """Raises unless `out_dir` is absent, empty, or `overwrite`; never the run's workdir or checkpoints."""
  out_dir = os.path.abspath(out_dir)
  real, run = os.path.realpath(out_dir), os.path.realpath(workdir)
  run_checkpoints = os.path.join(run, 'checkpoints')
  if real == run or os.path.commonpath([real, run_checkpoints]) == run_checkpoints:
    raise ValueError(f'out {out_dir!r} is the run\'s workdir or inside its checkpoints; expected another '
                     'directory')
  if os.path.isfile(out_dir):
    raise FileExistsError(f'out {out_dir!r} is a file; expected a directory')
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f'out {out_dir!r} exists and is not empty; expected a new or empty directory '
                          '(--overwrite replaces its checkpoints and posthoc.json)')


def write(out_dir: str, params: Any, record: dict, config: ml_collections.ConfigDict,
          overwrite: bool = False) -> str:
  """`<out_dir>/checkpoints/<step>/` (state {'params'}, config) and `<out_dir>/posthoc.json`; returns
  the checkpoint directory."""
  out_dir = os.path.abspath(out_dir)
  check_out_dir(out_dir, overwrite, record['workdir'])
  shutil.rmtree(os.path.join(out_dir, 'checkpoints'), ignore_errors=True)
  if os.path.exists(os.path.join(out_dir, 'posthoc.json')):
    os.remove(os.path.join(out_dir, 'posthoc.json'))
  directory = os.path.join(out_dir, 'checkpoints')
  with ocp.CheckpointManager(directory, item_names=('state', 'config'),
                             item_handlers={'state': ocp.StandardCheckpointHandler(),
                                            'config': ocp.JsonCheckpointHandler()},
                             options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
                             ) as manager:
    manager.save(int(record['step']), args=ocp.args.Composite(
        state=ocp.args.StandardSave({'params': params}), config=ocp.args.JsonSave(config.to_dict())), force=True)
    manager.wait_until_finished()
  write_json(os.path.join(out_dir, 'posthoc.json'), record)
  return os.path.join(directory, str(record['step']))


def main(argv):
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  FLAGS = flags.FLAGS
  check_out_dir(FLAGS.out, FLAGS.overwrite, os.path.abspath(FLAGS.workdir))
  params, record = synthesize(FLAGS.workdir, FLAGS.sigma_rel, FLAGS.step)
  path = write(FLAGS.out, params, record, run_config(record['workdir']), FLAGS.overwrite)
  print(f'sigma_rel {record["sigma_rel"]} at step {record["step"]} from {len(record["snapshots"])} snapshots '
        f'(steps {sorted({s["step"] for s in record["snapshots"]})}) -> {path}')


def _define_flags():
  from absl import flags

  flags.DEFINE_string('workdir', None, 'The train.py run directory (config.json, checkpoints/).', required=True)
  flags.DEFINE_float('sigma_rel', None, 'Relative std of the EMA to synthesise (0 < sigma_rel <~ 0.3).',
                     required=True)
  flags.DEFINE_integer('step', None, 'Last checkpoint step to use and the target step (default: the latest).')
  flags.DEFINE_string('out', None, 'Output directory: a params-only run checkpoint + posthoc.json.',
                      required=True)
  flags.DEFINE_bool('overwrite', False, 'Replace the checkpoints and posthoc.json of a non-empty --out.')


if __name__ == '__main__':
  tools.run_on_host_cpu(main, _define_flags)
