"""The training program: `build` (mesh, model, optimizer, abstract sharded state, jitted step) and
`train_and_evaluate` (the loop: resume, train, log, evaluate, checkpoint, preemption, NaN guard).

Same program on a 2-core CPU, one GPU and a TPU pod: everything that changes numerics or memory is
in the config. Start-up order (big_vision): the workdir's latest checkpoint > `train.init_from` >
scratch.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from clu import metric_writers
from tqdm import tqdm

from visaudio_jax import components
from visaudio_jax.data import loader, synthetic
from visaudio_jax.data.schema import ShardSpec, read_spec
from visaudio_jax.files import write_json, write_text
from visaudio_jax.model import sharding
from visaudio_jax.model.config import NetworkConfig, network_config
from visaudio_jax.model.network import FlowNetwork, feature_shapes
from visaudio_jax.train import checkpoint, evaluators, metrics, optim
from visaudio_jax.train import state as state_lib
from visaudio_jax.train import step as step_lib
from visaudio_jax.train.step import BATCH_FIELDS


@dataclasses.dataclass
class Program:
  """Everything the loop (and the AOT tool) needs, built once from the config and a mesh."""
  config: ml_collections.ConfigDict
  net: NetworkConfig
  model: FlowNetwork
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: state_lib.TrainState
  shardings: Any  # NamedShardings of every state leaf
  batch_sharding: jax.sharding.NamedSharding
  train_step: Callable  # (state, batch) -> (state, metrics), under the mesh and rules
  jitted_step: Any  # the bare jax.jit object, for .lower() (AOT)
  validation_loss: Callable  # (params, batch, key) -> metrics

  def abstract_batch(self, global_batch: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The training batch's shapes, laid out over ('data', 'fsdp')."""
    b = global_batch or int(self.config.train.global_batch_size)
    shapes = feature_shapes(self.net)
    shapes['latent_mean'] = shapes['latent_std'] = shapes.pop('latent')
    return {k: jax.ShapeDtypeStruct((b,) + s, jnp.float32, sharding=self.batch_sharding) for k, s in shapes.items()}

  def restore_target(self):
    return state_lib.with_shardings(self.abstract_state, self.shardings)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Program:
  net = network_config(config.model)
  mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  state_lib.check_batch_fits_mesh(int(config.train.global_batch_size), mesh, int(config.train.grad_accum_steps))
  model = FlowNetwork(net)
  tx, schedule = optim.make_optimizer(config.optim), optim.learning_rate_schedule(config.optim)
  abstract, specs = state_lib.abstract_state(net, config, tx)
  shardings = state_lib.state_shardings(specs, mesh, config.logical_axis_rules)
  batch_sharding = sharding.batch_sharding(mesh)
  train_step, jitted = step_lib.jit_train_step(config, model, tx, schedule, shardings, batch_sharding, mesh)
  val = step_lib.jit_validation_loss(config, model, shardings.params, batch_sharding, mesh)
  return Program(config, net, model, mesh, tx, schedule, abstract, shardings, batch_sharding, train_step, jitted, val)


# ---- start-up ------------------------------------------------------------------------------------

def initial_params_fn(program: Program) -> Callable[[], Any] | None:
  """`train.init_from`: '' (scratch), an MMAudio checkpoint (.pth / .safetensors, made binaural by the
  importer) or a previous run's workdir/checkpoint directory (its latest params)."""
  source = program.config.train.init_from
  if not source:
    return None
  if os.path.isdir(source):
    target = state_lib.with_shardings(program.abstract_state.params, program.shardings.params)
    params = components.restore_run_params(source, target)
  else:
    net, variables = components.network_params(program.config, source)
    if net != program.net:
      raise ValueError(f'init_from={source!r} gives network {net}, the config asks for {program.net}')
    params = variables['params']
  return lambda: params


def start_state(program: Program, manager, data_iter) -> tuple[state_lib.TrainState, int, str]:
  """(state, first step, how it started): resume the workdir's latest checkpoint (state and data
  position) if there is one, else a fresh state."""
  latest = manager.latest_step()
  if latest is not None:
    state = checkpoint.restore(manager, latest, program.restore_target(), data_iter)
    return state, int(latest), f'resumed from step {latest}'
  params_fn = initial_params_fn(program)
  state = state_lib.create_state(program.net, program.config, program.tx, program.shardings, program.mesh,
                                 params_fn)
  return state, 0, f'init_from {program.config.train.init_from}' if params_fn else 'from scratch'


def check_data(spec: ShardSpec, net: NetworkConfig, where: str) -> None:
  """The shards must hold exactly the network's inputs."""
  want = ShardSpec.from_network(net)
  for name in ('clip_f', 'sync_f', 'text_f', 'latent', 'pe_f'):
    if getattr(want, name) is not None and getattr(spec, name) != getattr(want, name):
      raise ValueError(f'{where}: {name} has shape {getattr(spec, name)}, the model config needs '
                       f'{getattr(want, name)}; extract features with the same config')


def write_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """config.json (+ git commit and package versions) in the workdir, on process 0, atomically."""
  if jax.process_index():
    return
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=10,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except OSError:
    commit = ''
  import flax
  import orbax.checkpoint
  record = {'config': config.to_dict(), 'git_commit': commit,
            'versions': {m.__name__: m.__version__ for m in (jax, flax, optax, orbax.checkpoint, np)},
            'devices': [str(d) for d in jax.devices()[:8]], 'device_count': jax.device_count(),
            'process_count': jax.process_count()}
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, 'config.json'), record)


# ---- the loop ------------------------------------------------------------------------------------

class NonFiniteLoss(RuntimeError):
  pass


class StepLog:
  """<workdir>/train_log.jsonl (`train.step_log`), one line per step (loss, grad norm, lr, the clip
  ids), on process 0. A resumed run first drops the lines past its checkpoint, so the file always reads as one
  uninterrupted run."""

  def __init__(self, path: str, start: int):
    self._file = None
    if jax.process_index():
      return
    kept = []
    if os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)['step'] <= start]
    write_text(path, ''.join(kept))
    self._file = open(path, 'a')

  def write(self, step: int, host: dict, ids) -> None:
    if self._file is None:
      return
    record = {'step': step, **{k: float(host[k]) for k in ('loss', 'grad_norm', 'learning_rate')}}
    record['ids'] = [i.decode() if isinstance(i, bytes) else str(i) for i in np.asarray(ids).tolist()]
    self._file.write(json.dumps(record) + '\n')

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class PendingMetrics:
  """The steps' device metrics since the last fetch. Fetching every step would make the host wait for
  the device each step; they are fetched on log steps and before anything that must see them (a
  checkpoint: no checkpoint is written after a non-finite loss; an evaluation), so the device runs
  ahead of the host in between (big_vision)."""

  def __init__(self, log: StepLog | None, on_step: Callable[[int, dict], None] | None, manager):
    self._log, self._on_step, self._manager = log, on_step, manager
    self._pending: list[tuple[int, dict, Any]] = []

  def add(self, step: int, device_metrics: dict, ids) -> None:
    self._pending.append((step, device_metrics, ids))

  def fetch(self) -> list[dict]:
    """Host copies of the pending metrics, checked finite, logged; raises NonFiniteLoss."""
    host = jax.device_get([m for _, m, _ in self._pending])
    for (step, _, ids), values in zip(self._pending, host):
      if not np.isfinite(values['loss']):
        raise NonFiniteLoss(f'loss is {values["loss"]} at step {step}; stopping. The last good checkpoint '
                            f'(step {self._manager.latest_step()}) is kept; resuming restarts from it')
      if self._log is not None:
        self._log.write(step, values, ids)
      if self._on_step:
        self._on_step(step, values)
    if self._log is not None:
      self._log.flush()
    self._pending = []
    return host


def _scalars(prefix: str, result: dict) -> dict[str, float]:
  """The numbers of an evaluator's (nested) result, flattened to TensorBoard names."""
  out = {}
  for key, value in result.items():
    if isinstance(value, dict):
      out.update(_scalars(f'{prefix}/{key}', value))
    elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
      out[f'{prefix}/{key}'] = float(value)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_step: Callable[[int, dict], None] | None = None) -> dict:
  """Train until `train.num_steps` (or SIGTERM / preemption, after a checkpoint), running the config's
  evaluators on their cadence. Returns a summary: how the run started and stopped, each final
  evaluator's result under `evals`, and the lines they want printed under `report`.
  `on_step(step, metrics)` is called on the host for every step, at each fetch (tests, tools)."""
  workdir = os.path.abspath(workdir)
  if config.train.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.train.compilation_cache_dir))
  synthetic.ensure_demo_data(config)  # the data step the config asks for (the CPU demo's BiAudio-mini)
  write_run_config(workdir, config)
  train_dir = os.path.join(config.data.dir, config.data.train_split)
  program = build(config)
  check_data(read_spec(train_dir), program.net, train_dir)
  data_iter = iter(loader.make_dataset(train_dir, config.data.train_split, None, int(config.train.global_batch_size),
                                       int(config.train.seed), worker_count=int(config.data.worker_count),
                                       skip_corrupt=bool(config.data.skip_corrupt)))
  manager = checkpoint.make_manager(workdir, config)
  state, start, how = start_state(program, manager, data_iter)
  num_steps = int(config.train.num_steps)
  writer = metric_writers.create_default_writer(os.path.join(workdir, 'tensorboard'),
                                                just_logging=jax.process_index() > 0, asynchronous=True)
  if start == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))})
  evals = evaluators.from_config(config.evals, program, workdir, writer)
  for scheduled in evals.values():
    scheduled.evaluator.start(state, how)
  logging.info('%s; %d params; mesh %s', how, sum(x.size for x in jax.tree.leaves(state.params)),
               dict(program.mesh.shape))
  watch = checkpoint.PreemptionWatch()
  log_every, batch_size = int(config.train.log_every), int(config.train.global_batch_size)
  log = StepLog(os.path.join(workdir, 'train_log.jsonl'), start) if config.train.step_log else None
  pending = PendingMetrics(log, on_step, manager)
  bar = tqdm(total=num_steps, initial=start, disable=jax.process_index() > 0, desc='train', unit='step')
  history, window_start, step = [], time.perf_counter(), start
  stopped_by = 'num_steps'
  try:
    while step < num_steps:
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        local = next(data_iter)
        batch = loader.to_global_arrays({k: v for k, v in local.items() if k in BATCH_FIELDS},
                                        program.batch_sharding)
        state, step_metrics = program.train_step(state, batch)
      step += 1
      pending.add(step, step_metrics, local['id'] if log is not None else None)
      bar.update(1)
      preempted = watch.requested(manager, step)
      saving = preempted or step == num_steps or manager.should_save(step)
      due = [name for name, e in evals.items() if e.due(step) and step < num_steps]
      log_step = step % log_every == 0 or step == num_steps
      if log_step or saving or due:
        history += pending.fetch()
      if log_step:
        seconds = (time.perf_counter() - window_start) / len(history)
        scalars = metrics.summarize(history)
        scalars.update(metrics.throughput(program.net, batch_size, seconds, program.net.duration_s))
        scalars.update(metrics.memory(), step_time_s=seconds)
        writer.write_scalars(step, scalars)
        bar.set_postfix(loss=f'{scalars["loss"]:.4f}', lr=f'{scalars["learning_rate"]:.2e}')
        history, window_start = [], time.perf_counter()
      for name in due:
        writer.write_scalars(step, _scalars(name, evals[name].evaluator.run(state, step)))
      checkpoint.save(manager, step, state, data_iter, config, force=preempted or step == num_steps)
      if preempted:
        stopped_by = 'preemption'
        break
  finally:
    bar.close()
    if log is not None:
      log.close()
    manager.wait_until_finished()
    writer.flush()
    watch.close()
  summary = {'workdir': workdir, 'start_step': start, 'final_step': step, 'stopped_by': stopped_by, 'how': how,
             'evals': {}, 'report': []}
  if stopped_by == 'num_steps':
    for name, scheduled in evals.items():
      if scheduled.final:
        result = scheduled.evaluator.run(state, step)
        writer.write_scalars(step, _scalars(name, result))
        summary['evals'][name] = result
        summary['report'] += scheduled.evaluator.report(result)
    writer.flush()
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, 'summary.json'), summary)
  multihost_utils.sync_global_devices('train_and_evaluate done')
  return summary
