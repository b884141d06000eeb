"""tools/posthoc_ema on a real tiny-config run: a train state saved at five steps with EMA values set
by hand, so the synthesised params are known without the tool. ema.start = 5 makes the snapshot
times (EMA updates done, step - 5) differ from the checkpoint steps, and the step-4 checkpoint,
saved before the EMAs start, holds no snapshot; a plain decay EMA with huge values must be ignored."""
import json
import os
import pathlib
import subprocess
import sys
import types

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from visaudio_jax import components
from visaudio_jax.model import sharding
from visaudio_jax.model.config import network_config
from visaudio_jax.tools import posthoc_ema
from visaudio_jax.train import checkpoint, optim, state as state_lib, trainer

ROOT = pathlib.Path(__file__).parents[1]
START = 5
STEPS = (4, 20, 40, 60, 80)
POWER = {'sigma_rel_0p05': 0.05, 'sigma_rel_0p1': 0.1}


def ema_leaves(run, step: int, name: str) -> list[np.ndarray]:
  """The hand-set EMA `name` at `step`: a per-(step, EMA) offset on a fixed random pattern per leaf."""
  offset = 1000.0 if name.startswith('decay') else step / 20 + (3.0 if name == 'sigma_rel_0p1' else 0.0)
  return [np.float32(offset) + p for p in run.patterns]


def expected(run, sigma_rel: float, step: int):
  """synthesize_ema over the snapshots up to `step`, each at time step - START, by hand."""
  snaps, times, gammas = [], [], []
  for s in STEPS:
    if START < s <= step:
      for name, sr in POWER.items():
        snaps.append(ema_leaves(run, s, name))
        times.append(s - START)
        gammas.append(optim.sigma_rel_to_gamma(sr))
  weights = optim.solve_posthoc_weights(times, gammas, sigma_rel, step - START)
  return optim.synthesize_ema(snaps, weights), weights


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  config = tiny.get_config()
  config.model.update(depth=2, fused_depth=1)  # a micro net: the tool does not care about the size
  config.ema.update(start=START, decays=[0.999])
  config.checkpoint.keep = len(STEPS)
  net = network_config(config.model)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices=jax.devices()[:1])
  tx = optim.make_optimizer(config.optim)
  abstract, specs = state_lib.abstract_state(net, config, tx)
  shardings = state_lib.state_shardings(specs, mesh, config.logical_axis_rules)
  state = state_lib.create_state(net, config, tx, shardings, mesh)
  assert set(state.ema) == set(POWER) | {'decay_0p999'}
  workdir = tmp_path_factory.mktemp('run')
  trainer.write_run_config(str(workdir), config)
  leaves, treedef = jax.tree.flatten(state.params)
  rng = np.random.default_rng(0)
  run = types.SimpleNamespace(workdir=str(workdir), config=config, treedef=treedef,
                              patterns=[rng.standard_normal(x.shape).astype(np.float32) for x in leaves],
                              target=state_lib.with_shardings(abstract.params, shardings.params))
  manager = checkpoint.make_manager(workdir, config)
  for step in STEPS:
    ema = {name: jax.tree.unflatten(treedef, [jnp.asarray(x) for x in ema_leaves(run, step, name)])
           for name in state.ema}
    data = iter(grain.MapDataset.range(4).to_iter_dataset())
    assert checkpoint.save(manager, step, state.replace(step=jnp.int32(step), ema=ema), data, config, force=True)
  manager.wait_until_finished()
  manager.close()
  return run


def restored_leaves(run, out_dir) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(components.restore_run_params(out_dir, run.target))]


@pytest.mark.integration
def test_cli_writes_the_synthesized_ema_as_an_init_from_checkpoint(run, tmp_path):
  out = tmp_path / 'ema_0p07'
  proc = subprocess.run([sys.executable, '-m', 'visaudio_jax.tools.posthoc_ema', f'--workdir={run.workdir}',
                         '--sigma_rel=0.07', f'--out={out}'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out / 'checkpoints')) == ['80']
  assert {'state', 'config'} <= set(os.listdir(out / 'checkpoints' / '80'))
  want, weights = expected(run, 0.07, 80)
  for got, ref in zip(restored_leaves(run, out), want, strict=True):
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
  record = json.loads((out / 'posthoc.json').read_text())
  assert (record['sigma_rel'], record['step'], record['time']) == (0.07, 80, 80 - START)
  used = [(s['step'], s['ema'], s['time']) for s in record['snapshots']]
  assert used == [(s, name, s - START) for s in STEPS[1:] for name in POWER]
  np.testing.assert_allclose([s['weight'] for s in record['snapshots']], weights, rtol=1e-12)
  # The mix is a real blend of both tracks, not a copy of the latest snapshot.
  assert np.sum(np.abs(weights) > 1e-3) >= 3


def test_tracked_sigma_rel_reproduces_its_ema_and_step_picks_the_last_checkpoint(run):
  for sigma_rel, step, name in ((0.05, 80, 'sigma_rel_0p05'), (0.1, 60, 'sigma_rel_0p1')):
    params, record = posthoc_ema.synthesize(run.workdir, sigma_rel, step=step)
    assert {s['step'] for s in record['snapshots']} == {s for s in STEPS if START < s <= step}
    for got, ref in zip(jax.tree.leaves(params), ema_leaves(run, step, name), strict=True):
      np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)  # measured: exact (one-hot weights)
    for got, ref in zip(jax.tree.leaves(params), expected(run, sigma_rel, step)[0], strict=True):
      np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_out_dir_is_refused_unless_overwrite(run, tmp_path):
  params, record = posthoc_ema.synthesize(run.workdir, 0.1)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'notes.txt').write_text('keep')
  with pytest.raises(FileExistsError, match='not empty'):
    posthoc_ema.write(str(out), params, record, run.config)
  for inside in (run.workdir, os.path.join(run.workdir, 'checkpoints', 'ema')):
    with pytest.raises(ValueError, match='workdir'):
      posthoc_ema.write(inside, params, record, run.config, overwrite=True)
  posthoc_ema.write(str(out), params, record, run.config, overwrite=True)
  params, record = posthoc_ema.synthesize(run.workdir, 0.05, step=60)
  posthoc_ema.write(str(out), params, record, run.config, overwrite=True)
  assert sorted(os.listdir(out)) == ['checkpoints', 'notes.txt', 'posthoc.json']
  assert sorted(os.listdir(out / 'checkpoints')) == ['60']
  for got, ref in zip(restored_leaves(run, out), expected(run, 0.05, 60)[0], strict=True):
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_errors_name_the_problem(run, tmp_path):
  with pytest.raises(FileNotFoundError, match='no such directory'):
    posthoc_ema.synthesize(str(tmp_path / 'missing'), 0.07)
  for bad in (0.0, -0.05):
    with pytest.raises(ValueError, match='must be positive'):
      posthoc_ema.synthesize(run.workdir, bad)
  with pytest.raises(ValueError, match='at most'):
    posthoc_ema.synthesize(run.workdir, 0.5)
  for step in (50, 100):
    with pytest.raises(ValueError, match='after the last snapshot'):
      posthoc_ema.synthesize(run.workdir, 0.07, step=step)
  with pytest.raises(ValueError, match='0 power-EMA snapshots'):
    posthoc_ema.synthesize(run.workdir, 0.07, step=4)  # the EMAs had not started
  stored = json.loads((pathlib.Path(run.workdir) / 'config.json').read_text())
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'config.json').write_text(json.dumps(stored))
  with pytest.raises(FileNotFoundError, match='no checkpoints'):
    posthoc_ema.synthesize(str(empty), 0.07)
  stored['config']['ema']['sigma_rels'] = []
  (empty / 'config.json').write_text(json.dumps(stored))
  with pytest.raises(ValueError, match='no power EMA'):
    posthoc_ema.synthesize(str(empty), 0.07)
