"""The TPU path compiles without TPUs: the tiny config's sharded train step, AOT for a v5p slice
(`visaudio_jax/tools/aot.py`, compile-only devices from the libtpu wheel in requirements-test.txt)."""
import math

import jax
import pytest

from configs import tiny
from visaudio_jax.model import sharding
from visaudio_jax.model.config import network_config
from visaudio_jax.tools import aot
from visaudio_jax.train import metrics, trainer

pytestmark = pytest.mark.integration  # a TPU compile of the whole train step


def _tiny():
  return tiny.get_config()


@pytest.fixture(scope='module')
def compiled():
  try:
    import libtpu  # noqa: F401
  except ImportError:
    pytest.fail('the libtpu wheel is missing: pip install -r requirements-test.txt')
  return aot.compile_for_topology(_tiny(), 'v5p:2x2x1')


def _state_bytes_per_device(config, n_devices):
  """The sharded TrainState's bytes on one device, from the abstract state and its shardings on an
  equally shaped CPU mesh (the per-device shard shapes depend only on the mesh shape)."""
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices=jax.devices()[:n_devices])
  program = trainer.build(config, mesh)
  return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
             for a, s in zip(jax.tree.leaves(program.abstract_state), jax.tree.leaves(program.shardings)))


def test_tiny_compiles_for_v5p(compiled):
  assert compiled['chips'] == 4 and compiled['device_kind'] == 'TPU v5'
  assert compiled['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  assert compiled['global_batch'] == 16 and compiled['per_chip_batch'] == 4


def test_memory_plan_is_plausible(compiled):
  state = _state_bytes_per_device(_tiny(), 4)
  assert compiled['state_bytes_per_chip'] == state
  batch = compiled['batch_bytes_per_chip']
  assert batch > 0
  # Arguments are the state shard and the batch shard (plus alignment padding).
  assert state + batch <= compiled['argument_bytes'] <= 1.5 * (state + batch)
  # The next state comes out in the donated buffers.
  assert compiled['output_bytes'] >= state
  assert compiled['alias_bytes'] >= 0.9 * state
  assert compiled['temp_bytes'] > 0 and compiled['generated_code_bytes'] > 0
  assert compiled['argument_bytes'] <= compiled['total_bytes'] < compiled['hbm_bytes'] == 95 * aot.GiB
  assert compiled['fits']


def test_flops_match_the_analytic_count(compiled):
  analytic = metrics.train_flops_per_example(network_config(_tiny().model)) * 16 / 4
  assert compiled['analytic_flops_per_chip'] == pytest.approx(analytic)
  # XLA counts every op (norms, softmax, the optimizer) and, with remat, the recomputed forward.
  assert 0.5 < compiled['xla_over_analytic'] < 3, compiled['xla_over_analytic']


def test_batch_that_does_not_split_over_the_mesh_is_a_clear_error():
  with pytest.raises(ValueError, match=r'v5p:2x2x1 \(4 chips.*global_batch_size=6 .*divisible by the data x fsdp'):
    aot.compile_for_topology(_tiny(), 'v5p:2x2x1', global_batch=6)


def test_bad_topology_names():
  with pytest.raises(ValueError, match='expected <chip>'):
    aot.parse_topology('v5p-128')
  with pytest.raises(ValueError, match='3 dimensions'):
    aot.parse_topology('v5p:4x4')
  assert aot.parse_topology('v5e:16x16')[1] == (16, 16)


def test_state_that_does_not_split_over_fsdp_is_a_clear_error():
  """configs/large.py's FSDP over all chips stops at 128 chips: 896 channels do not split 256 ways."""
  mesh = sharding.make_mesh((1, 4, 1), devices=jax.devices()[:4])
  target = {'w': jax.ShapeDtypeStruct((2, 6), jax.numpy.float32,
                                      sharding=jax.sharding.NamedSharding(mesh, jax.P(None, 'fsdp')))}
  with pytest.raises(ValueError, match=r"\['w'\] \(2, 6\) over \('fsdp',\).*mesh.shape=\"\(2,2,1\)\""):
    aot.check_state_splits(target, mesh, 'here')
  aot.check_state_splits(target, sharding.make_mesh((2, 2, 1), devices=jax.devices()[:4]), 'here')
