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

from visaudio_jax.data import loader
from visaudio_jax.data.schema import ShardSpec, read_spec
from visaudio_jax.model import sharding
from visaudio_jax.model.config import NetworkConfig, network_config
from visaudio_jax.model.network import FlowNetwork, feature_shapes
from visaudio_jax.train import checkpoint, metrics, optim
from visaudio_jax.train import state as state_lib
from visaudio_jax.train import step as step_lib

TRAIN_FIELDS = ('clip_f', 'sync_f', 'text_f', 'pe_f', 'latent_mean', 'latent_std')


@dataclasses.dataclass
class Program:
  """Everything the loop (and the AOT tool) needs, built once from the config and a mesh."""
  config: ml_collections.ConfigDict
  cfg: NetworkConfig
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
    shapes = feature_shapes(self.cfg)
    shapes['latent_mean'] = shapes['latent_std'] = shapes.pop('latent')
    return {k: jax.ShapeDtypeStruct((b,) + s, jnp.float32, sharding=self.batch_sharding) for k, s in shapes.items()}

  def restore_target(self):
    return state_lib.with_shardings(self.abstract_state, self.shardings)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Program:
  cfg = network_config(config.model)
  mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  state_lib.check_batch_fits_mesh(int(config.train.global_batch_size), mesh, int(config.train.grad_accum_steps))
  model = FlowNetwork(cfg)
  tx, schedule = optim.make_optimizer(config.optim), optim.learning_rate_schedule(config.optim)
  abstract, specs = state_lib.abstract_state(cfg, config, tx)
  shardings = state_lib.state_shardings(specs, mesh, config.logical_axis_rules)
  batch_sharding = state_lib.batch_sharding(mesh)
  train_step, jitted = step_lib.jit_train_step(config, model, tx, schedule, shardings, batch_sharding, mesh)
  val = step_lib.jit_validation_loss(config, model, shardings.params, batch_sharding, mesh)
  return Program(config, cfg, model, mesh, tx, schedule, abstract, shardings, batch_sharding, train_step, jitted, val)


# ---- start-up ------------------------------------------------------------------------------------

def initial_params_fn(program: Program) -> Callable[[], Any] | None:
  """`train.init_from`: '' (scratch), an MMAudio checkpoint (.pth / .safetensors, made binaural by the
  importer) or a previous run's workdir/checkpoint directory (its latest params)."""
  source = program.config.train.init_from
  if not source:
    return None
  if os.path.isdir(source):
    target = state_lib.with_shardings(program.abstract_state.params, program.shardings.params)
    params = checkpoint.restore_params(source, target)
  else:
    from visaudio_jax.eval.sampling import load_params  # the importer path sample.py uses
    cfg, variables = load_params(program.config, source)
    if cfg != program.cfg:
      raise ValueError(f'init_from={source!r} gives network {cfg}, the config asks for {program.cfg}')
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
  state = state_lib.create_state(program.cfg, program.config, program.tx, program.shardings, program.mesh,
                                 params_fn)
  return state, 0, f'init_from {program.config.train.init_from}' if params_fn else 'from scratch'


def check_data(spec: ShardSpec, cfg: NetworkConfig, where: str) -> None:
  """The shards must hold exactly the network's inputs."""
  want = ShardSpec.from_network(cfg)
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
  tmp = os.path.join(workdir, f'.config.json.{os.getpid()}')
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=1, default=str)
  os.replace(tmp, os.path.join(workdir, 'config.json'))


# ---- evaluation during training ------------------------------------------------------------------

def eval_batches(config: ml_collections.ConfigDict, batch_size: int, count: int) -> list[dict]:
  """The first `count` batches of the eval split, unshuffled: the same examples every evaluation."""
  directory = os.path.join(config.data.dir, config.data.eval_split)
  it = iter(loader.make_dataset(directory, config.data.eval_split, None, batch_size, 0, shuffle=False,
                                num_epochs=None))
  return [next(it) for _ in range(count)]


def validation_loss(program: Program, params, batches: list[dict]) -> dict[str, float]:
  key = jax.random.key(0)  # fixed: comparable across evaluations
  history = []
  for i, batch in enumerate(batches):
    arrays = loader.to_global_arrays({k: batch[k] for k in TRAIN_FIELDS if k in batch}, program.batch_sharding)
    history.append(jax.device_get(program.validation_loss(params, arrays, jax.random.fold_in(key, i))))
  return {f'val_{k}': v for k, v in metrics.summarize(history).items()}


# ---- the loop ------------------------------------------------------------------------------------

class NonFiniteLoss(RuntimeError):
  pass


class StepLog:
  """<workdir>/train_log.jsonl, one line per step (loss, grad norm, lr; optionally the clip ids), on
  process 0. A resumed run first drops the lines past its checkpoint, so the file always reads as one
  uninterrupted run."""

  def __init__(self, path: str, start: int):
    self._file = None
    if jax.process_index():
      return
    kept = []
    if os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)['step'] <= start]
    tmp = f'{path}.{os.getpid()}'
    with open(tmp, 'w') as f:
      f.writelines(kept)
    os.replace(tmp, path)
    self._file = open(path, 'a')

  def write(self, step: int, host: dict, ids=None) -> None:
    if self._file is None:
      return
    record = {'step': step, **{k: float(host[k]) for k in ('loss', 'grad_norm', 'learning_rate')}}
    if ids is not None:
      record['ids'] = [i.decode() if isinstance(i, bytes) else str(i) for i in np.asarray(ids).tolist()]
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_step: Callable[[int, dict], None] | None = None) -> dict:
  """Train until `train.num_steps` (or SIGTERM / preemption, after a checkpoint). Returns a summary.
  `on_step(step, metrics)` is called on the host after every step (tests, tools)."""
  from clu import metric_writers  # imports TensorFlow: only the training process pays for it
  from tqdm import tqdm

  from visaudio_jax.train import sampling_eval

  workdir = os.path.abspath(workdir)
  if config.train.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.train.compilation_cache_dir))
  write_run_config(workdir, config)
  train_dir = os.path.join(config.data.dir, config.data.train_split)
  program = build(config)
  check_data(read_spec(train_dir), program.cfg, train_dir)
  data_iter = iter(loader.make_dataset(train_dir, config.data.train_split, None, int(config.train.global_batch_size),
                                       int(config.train.seed), worker_count=int(config.data.worker_count),
                                       skip_corrupt=bool(config.data.skip_corrupt)))
  manager = checkpoint.make_manager(workdir, config)
  state, start, how = start_state(program, manager, data_iter)
  final_eval = int(config.eval.final_num_samples) > 0
  # The final check's untrained baseline; re-creating it at the end costs another init compile.
  untrained_params = jax.device_get(state.params) if final_eval and how == 'from scratch' else None
  num_steps = int(config.train.num_steps)
  writer = metric_writers.create_default_writer(os.path.join(workdir, 'tensorboard'),
                                                just_logging=jax.process_index() > 0, asynchronous=True)
  if start == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))})
  logging.info('%s; %d params; mesh %s', how, sum(x.size for x in jax.tree.leaves(state.params)),
               dict(program.mesh.shape))
  watch = checkpoint.PreemptionWatch()
  val_batches = None
  audio_seconds = program.cfg.duration_s
  log = StepLog(os.path.join(workdir, 'train_log.jsonl'), start)
  bar = tqdm(total=num_steps, initial=start, disable=jax.process_index() > 0, desc='train', unit='step')
  history, window_start, step = [], time.perf_counter(), start
  stopped_by = 'num_steps'
  try:
    while step < num_steps:
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        local = next(data_iter)
        batch = loader.to_global_arrays({k: v for k, v in local.items() if k in TRAIN_FIELDS},
                                        program.batch_sharding)
        state, step_metrics = program.train_step(state, batch)
      step += 1
      host = jax.device_get(step_metrics)
      if not np.isfinite(host['loss']):
        raise NonFiniteLoss(f'loss is {host["loss"]} at step {step}; stopping. The last good checkpoint '
                            f'(step {manager.latest_step()}) is kept; resuming restarts from it')
      log.write(step, host, local['id'] if config.train.log_batch_ids else None)
      history.append(host)
      if on_step:
        on_step(step, host)
      bar.update(1)
      if step % int(config.train.log_every) == 0 or step == num_steps:
        seconds = (time.perf_counter() - window_start) / len(history)
        scalars = metrics.summarize(history)
        scalars.update(metrics.throughput(program.cfg, int(config.train.global_batch_size), seconds, audio_seconds))
        scalars.update(metrics.memory(), step_time_s=seconds)
        writer.write_scalars(step, scalars)
        bar.set_postfix(loss=f'{scalars["loss"]:.4f}', lr=f'{scalars["learning_rate"]:.2e}')
        history, window_start = [], time.perf_counter()
      if config.eval.every and (step % int(config.eval.every) == 0 or step == num_steps):
        val_batches = val_batches or eval_batches(config, int(config.train.global_batch_size),
                                                  int(config.eval.loss_batches))
        writer.write_scalars(step, validation_loss(program, state.params, val_batches))
      if config.eval.sample_every and step % int(config.eval.sample_every) == 0 and step < num_steps:
        writer.write_scalars(step, sampling_eval.periodic(program, state, step, workdir, writer))
      preempted = watch.requested(manager, step)
      checkpoint.save(manager, step, state, data_iter, config, force=preempted or step == num_steps)
      if preempted:
        stopped_by = 'preemption'
        break
  finally:
    bar.close()
    log.close()
    manager.wait_until_finished()
    writer.flush()
    watch.close()
  summary = {'workdir': workdir, 'start_step': start, 'final_step': step, 'stopped_by': stopped_by, 'how': how}
  if stopped_by == 'num_steps' and final_eval:
    summary['final_eval'] = sampling_eval.final(program, state, workdir, untrained_params)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=1)
  multihost_utils.sync_global_devices('train_and_evaluate done')
  return summary

