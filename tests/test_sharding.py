"""Sharding on 8 simulated CPU devices: every param has logical names, the rules map them onto a
(2, 2, 2) ('data', 'fsdp', 'tensor') mesh, and the sharded forward equals the single-device one."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from test_network import _features, _tiny_binaural
from mmaudio_fixtures import rel_err
from configs import common, tiny
from visaudio_jax.model import sharding
from visaudio_jax.model.network import FlowNetwork, init_variables
from visaudio_jax.train import state as state_lib


def test_every_param_has_logical_axis_names():
  cfg = dataclasses.replace(_tiny_binaural(), scan_layers=True)
  specs = sharding.logical_specs(cfg)
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.P))[0]
  abstract = jax.tree.leaves(nn.meta.unbox(jax.eval_shape(lambda: init_variables(cfg))))
  assert len(flat) == len(abstract)
  for (path, spec), leaf in zip(flat, abstract):
    assert isinstance(spec, jax.P) and len(spec) == leaf.ndim, jax.tree_util.keystr(path)
  named = {jax.tree_util.keystr(p): s for p, s in flat}
  assert named["['params']['joint_blocks']['latent_block']['qkv']['kernel']"] == jax.P(
      'layers', 'ear', 'embed', 'qkv', 'heads', 'head_dim')


def _init_on_mesh(net, mesh, rules):
  """The production sharded init (train/state.py): params created in their shardings."""
  config = tiny.get_config()
  config.logical_axis_rules = [list(r) for r in rules]
  tx = optax.identity()
  _, specs = state_lib.abstract_state(net, config, tx)
  shardings = state_lib.state_shardings(specs, mesh, rules)
  return {'params': state_lib.create_state(net, config, tx, shardings, mesh).params}


def _sharded_vs_local(shape, rules=common.LOGICAL_AXIS_RULES):
  cfg = _tiny_binaural(depth=2, fused_depth=1)
  mesh = sharding.make_mesh(shape)
  params = _init_on_mesh(cfg, mesh, rules)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jax.device_put(x + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                                                 x.sharding), params)
  feats = _features(cfg, 8)
  latent = feats.pop('latent')
  t = np.linspace(0.1, 0.9, 8, dtype=np.float32)
  local = jax.jit(FlowNetwork(cfg).apply)(jax.device_get(params), latent, t, **feats)
  batch = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules([tuple(r) for r in rules]):
    out = jax.jit(FlowNetwork(cfg).apply)(params, jax.device_put(latent, batch), jax.device_put(t, batch),
                                          **{k: jax.device_put(v, batch) for k, v in feats.items()})
  return params, out, local, batch


@pytest.mark.parametrize('shape', [(2, 2, 2), (4, 2, 1), (4, 1, 2), (2, 4, 1)])
def test_sharded_forward_matches_single_device(shape):
  params, out, local, batch = _sharded_vs_local(shape)
  qkv = params['params']['last_joint_block']['latent_block']['qkv']['kernel']  # (ear, embed, 3, heads, dh)
  assert qkv.sharding.spec == jax.P(None, 'fsdp', None, 'tensor', None)
  fsdp, tensor = shape[1], shape[2]
  assert qkv.addressable_shards[0].data.shape == (2, 24 // fsdp, 3, 2 // tensor, 12)
  assert out.sharding.is_equivalent_to(batch, out.ndim)
  assert rel_err(out, local) < 1e-5


@pytest.mark.xfail(strict=True, reason='XLA CPU (jax 0.10.2) miscompiles when the adaLN output axis, later '
                   'split into shift/scale/gate chunks, is sharded over tensor on a mesh whose data, fsdp and '
                   'tensor axes all exceed 1 (about 5% error in the clip/text stream updates). The default '
                   'rules keep that axis unsharded; strict: this fails the day XLA is fixed.')
def test_tensor_sharded_modulation_on_a_three_axis_mesh():
  rules = [r for r in common.LOGICAL_AXIS_RULES if r[0] != 'modulation'] + [('modulation', 'tensor')]
  _, out, local, _ = _sharded_vs_local((2, 2, 2), rules)
  assert rel_err(out, local) < 1e-5


def test_mesh_shape_errors():
  with pytest.raises(ValueError, match='needs 12 devices'):
    sharding.make_mesh((3, 2, 2))
  assert sharding.make_mesh((-1, 2, 1)).shape == {'data': 4, 'fsdp': 2, 'tensor': 1}
