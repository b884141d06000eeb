"""Train the binaural flow network: `python train.py --config=configs/<name>.py[:flags] --workdir=DIR`.

  python train.py --config=configs/tiny.py --workdir=runs/tiny          # the CPU demo (~15 min, 2 cores)
  python train.py --config=configs/large.py --workdir=gs://bucket/run    # MMAudio-L recipe, binaural
  python train.py --config=configs/tiny.py --workdir=runs/t --config.train.num_steps=100 --config.optim.lr=3e-4

The config is written to <workdir>/config.json; checkpoints go to <workdir>/checkpoints (the run
resumes from the latest automatically), TensorBoard logs to <workdir>/tensorboard, samples to
<workdir>/samples. Several processes (TPU pods, SLURM, or --num_processes/--process_id/
--coordinator_address by hand) join one run through `jax.distributed.initialize`.
"""
import os
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:flags]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: config, checkpoints, logs, samples.', required=True)
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process by hand).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process by hand).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (multi-process by hand).')



def _multi_process_cluster() -> bool:
  """A cluster environment with several processes, where jax.distributed.initialize() finds its peers
  by itself (SLURM, Open MPI, multi-host TPU slices)."""
  env = os.environ
  return (int(env.get('SLURM_NTASKS', '1') or 1) > 1 or int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1
          or ',' in env.get('TPU_WORKER_HOSTNAMES', '') or bool(env.get('MEGASCALE_COORDINATOR_ADDRESS')))


def _init_distributed():
  import jax
  if _NUM_PROCESSES.value and _NUM_PROCESSES.value > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU backend only: real collectives
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _multi_process_cluster():
    jax.distributed.initialize()


def _ensure_synthetic_data(config):
  """The tiny demo's data: BiAudio-mini rendered and feature-extracted when the shards are absent."""
  import jax
  from jax.experimental import multihost_utils

  spec = pathlib.Path(config.data.dir, config.data.train_split, 'spec.json')
  if spec.exists() or not config.data.synthetic.enabled:
    return
  if jax.process_index() == 0:
    from data_prep import synthetic
    syn = config.data.synthetic
    scene = synthetic.SyntheticConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                                         for k, v in syn.scene.items()})
    print(f'building BiAudio-mini ({syn.num_clips} clips) into {config.data.dir}')
    synthetic.build(syn.clips_dir, synthetic.split_sizes(syn.num_clips), scene, syn.seed,
                    shards=config.data.dir, experiment=config)
  multihost_utils.sync_global_devices('synthetic data ready')


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:  # absl.app starts at INFO; Orbax logs every save there
    logging.set_verbosity(logging.WARNING)
  _init_distributed()
  from visaudio_jax.train import trainer

  config = flags.FLAGS.config
  _ensure_synthetic_data(config)
  summary = trainer.train_and_evaluate(config, _WORKDIR.value)
  final = summary.get('final_eval', {})
  print(f"\n{summary['how']}; stopped at step {summary['final_step']} ({summary['stopped_by']}); "
        f"workdir {summary['workdir']}")
  if 'ild_side_agreement' in final:
    print(f"ILD side agreement on {final['lateral_clips']} clearly lateral held-out clips "
          f"({final['split']} split, {final['clips']} clips):")
    for name, value in final['ild_side_agreement'].items():
      samples = final['scored_samples'][name]
      draws = f' ({samples // final["lateral_clips"]} noise draws per clip)' if samples > final['lateral_clips'] else ''
      print(f'  {name:<16} ' + ('   -' if value is None else f'{100 * value:5.1f} %  of {samples}{draws}'))


if __name__ == '__main__':
  app.run(main)
