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

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from visaudio_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:flags]).', lock_config=True)
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
  if _NUM_PROCESSES.value and _NUM_PROCESSES.value > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU backend only: real collectives
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _multi_process_cluster():
    jax.distributed.initialize()


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:  # absl.app starts at INFO; Orbax logs every save there
    logging.set_verbosity(logging.WARNING)
  _init_distributed()
  summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(f"\n{summary['how']}; stopped at step {summary['final_step']} ({summary['stopped_by']}); "
        f"workdir {summary['workdir']}")
  print('\n'.join(summary['report']))


if __name__ == '__main__':
  app.run(main)
