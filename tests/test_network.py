"""The network: MMAudio-exact sizes, full-size checkpoint mapping, binaural init, layouts, bad input.

Fixtures: tests/fixtures/mmaudio_net/manifest_*.json (key/shape manifests of the real MMAudio
checkpoints, built by the original code on the meta device) and the tiny golden nets
(shared/fixtures/mmaudio_net/README.md).
"""
import dataclasses
import functools
import importlib.util
import json
import pathlib

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_path
from mmaudio_fixtures import rel_err, tiny_config, tiny_io
from visaudio_jax.convert import mmaudio
from visaudio_jax.convert.torch_io import CheckpointError, write_safetensors
from visaudio_jax.model import layout
from visaudio_jax.model.config import NetworkConfig, SpacetimeConfig, network_config
from visaudio_jax.model.network import FlowNetwork, feature_shapes

PRESETS = {'small_16k': 157_283_644, 'small_44k': 157_409_144, 'medium_44k': 621_805_944,
           'large_44k': 1_030_002_168, 'large_44k_v2': 1_030_575_608}
CONFIGS = pathlib.Path(__file__).parents[1] / 'configs'


def load_config(name: str, arg=None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('preset', PRESETS)
def test_mono_parameter_count_equals_mmaudio(preset):
  cfg = network_config(load_config(preset, 'mono').model)
  assert count(mmaudio.abstract_params(cfg)) == PRESETS[preset]


@pytest.mark.parametrize('preset', PRESETS)
def test_full_size_checkpoint_maps_key_for_key(preset):
  """Every key of the real checkpoint lands on a param of our model with the right shape, and every
  param of ours is fed by exactly one key (shapes through jax.eval_shape; nothing allocated)."""
  manifest = json.loads(fixture_path('mmaudio_net', f'manifest_{preset}.json').read_text())
  cfg = mmaudio.infer_config({e['key']: np.broadcast_to(np.float32(0), e['shape']) for e in manifest['state_dict']})
  assert count(mmaudio.abstract_params(cfg)) == manifest['total_parameters']
  ours = mmaudio.abstract_params(cfg)['params']
  flat = traverse_util.flatten_dict(ours)
  key_map = {m.torch_key: m for m in mmaudio.mmaudio_key_map(cfg)}
  assert set(key_map) == {e['key'] for e in manifest['state_dict']}
  leaves = {tuple(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(ours)[0]}
  assert {m.path for m in key_map.values()} == leaves and len(key_map) == len(leaves)
  for e in manifest['state_dict']:
    m = key_map[e['key']]
    got = jax.eval_shape(m.to_flax, jax.ShapeDtypeStruct(tuple(e['shape']), jnp.float32)).shape
    want = flat[m.path].shape
    assert got == want, (e['key'], got, want)
    back = jax.eval_shape(m.to_torch, jax.ShapeDtypeStruct(want, jnp.float32)).shape
    assert back == tuple(e['shape']), e['key']


def test_export_round_trip_is_exact():
  cfg, params = mmaudio.load_mmaudio(fixture_path('mmaudio_net', 'tiny_v2_state.safetensors'), tiny_config('tiny_v2'))
  state = mmaudio.params_to_state_dict(params, cfg)
  from visaudio_jax.convert.torch_io import read_state_dict
  original = read_state_dict(fixture_path('mmaudio_net', 'tiny_v2_state.safetensors'))
  assert set(state) == set(original)
  for k in original:
    np.testing.assert_array_equal(state[k], original[k], err_msg=k)


def test_one_ear_of_a_binaural_model_exports_to_mmaudio():
  mono_cfg, mono = mmaudio.load_mmaudio(fixture_path('mmaudio_net', 'tiny_v1_state.safetensors'), tiny_config('tiny_v1'))
  cfg, params = mmaudio.to_binaural(mono_cfg, mono, spacetime=_tiny_binaural().spacetime)
  params['params']['final_layer']['conv']['bias'][1] += 1.0  # make the right ear differ
  original = mmaudio.params_to_state_dict(mono, mono_cfg)
  for ear, shift in ((0, 0.0), (1, 1.0)):
    back_cfg, back = mmaudio.ear_params(cfg, params, ear)
    state = mmaudio.params_to_state_dict(back, back_cfg)
    assert set(state) == set(original)
    np.testing.assert_array_equal(state['final_layer.conv.bias'], original['final_layer.conv.bias'] + shift)
    np.testing.assert_array_equal(state['joint_blocks.0.latent_block.attn.qkv.weight'],
                                  original['joint_blocks.0.latent_block.attn.qkv.weight'])
  with pytest.raises(ValueError, match='ear must be'):
    mmaudio.ear_params(cfg, params, 2)


@pytest.mark.parametrize('duration,lens16,lens44', [
    (1.0, (32, 8, 16), 44), (4.0, (125, 32, 88), 173), (8.0, (250, 64, 192), 345),
    (10.0, (313, 80, 240), 431), (16.0, (500, 128, 392), 690)])
def test_sequence_lengths_follow_duration(duration, lens16, lens44):
  """MMAudio's SequenceConfig table (spec/mmaudio.md 1.2)."""
  c16 = network_config(load_config('small_16k', 'mono').model.to_dict() | {'duration_s': duration})
  c44 = network_config(load_config('small_44k', 'mono').model.to_dict() | {'duration_s': duration})
  l16, l44 = c16.seq_lens(), c44.seq_lens()
  assert (l16.latent, l16.clip, l16.sync) == lens16
  assert l44.latent == lens44 and l44.audio_samples % 1024 == 0


def _tiny_binaural(**overrides) -> NetworkConfig:
  spacetime = SpacetimeConfig(enabled=True, pe_dim=8, grid_h=3, grid_w=2, fps=2.0, pool_dim=16, pool_heads=2)
  return dataclasses.replace(tiny_config('tiny_v1'), channels=2, spacetime=spacetime, **({'duration_s': 2.0} | overrides))


def _features(cfg: NetworkConfig, batch: int = 2, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal((batch,) + s), jnp.float32) for k, s in feature_shapes(cfg).items()}


def _perturb(params, seed=1, scale=0.05):
  """Non-zero values everywhere (fresh init zeroes adaLN, final conv...), so comparisons mean something."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.float32), params)


@pytest.mark.parametrize('branch_weights', ['separate', 'shared'])
def test_binaural_init_from_mmaudio_reproduces_it_on_each_ear(branch_weights):
  """Both ears copied from MMAudio, spacetime projection at zero: equal latents give MMAudio's flow."""
  io = tiny_io('tiny_v1')
  mono_cfg, mono = mmaudio.load_mmaudio(fixture_path('mmaudio_net', 'tiny_v1_state.safetensors'), tiny_config('tiny_v1'))
  cfg, params = mmaudio.to_binaural(mono_cfg, mono, spacetime=_tiny_binaural().spacetime)
  cfg = dataclasses.replace(cfg, branch_weights=branch_weights)
  if branch_weights == 'shared':  # the 'shared' variant starts from the same single branch
    cfg, params = mmaudio.to_binaural(dataclasses.replace(mono_cfg, branch_weights='shared'), mono,
                                      spacetime=cfg.spacetime)
  inp = {k: jnp.asarray(io[f'inputs/{k}'], jnp.float32) for k in ('latent', 'clip_f', 'sync_f', 'text_f', 't')}
  pe = _features(cfg, 3)['pe_f']
  stereo = jnp.stack([inp['latent']] * 2, axis=1)
  with jax.default_matmul_precision('highest'):
    got = jax.jit(FlowNetwork(cfg).apply)(params, stereo, inp['t'], inp['clip_f'], inp['sync_f'], inp['text_f'], pe)
    ref = jax.jit(mmaudio.forward, static_argnums=0)(mono_cfg, mono, inp['latent'], inp['clip_f'], inp['sync_f'],
                                                     inp['text_f'], inp['t'])
  assert got.shape == (3, 2, 43, 10)
  for ear in range(2):
    assert rel_err(got[:, ear], ref) < 2e-6
  assert rel_err(ref, io['f32/forward']) < 2e-6  # our own mono port agrees with the torch f32 run


@functools.cache
def fresh_params(cfg: NetworkConfig):
  """Fresh init, cached per config: compiling the init of even a tiny net takes XLA ~10 s."""
  return jax.tree.map(np.asarray, nn.meta.unbox(mmaudio.init_params(cfg)))


def _init(cfg):
  return _perturb(fresh_params(cfg))


def _inputs(cfg, batch=2):
  """Perturbed params, a latent (B, E, N, C) and the condition features for one config."""
  feats = _features(cfg, batch)
  return _init(cfg), feats.pop('latent'), feats


def test_scan_equals_unrolled():
  cfg = _tiny_binaural(depth=5, fused_depth=2)
  params, latent, feats = _inputs(cfg)
  t = jnp.array([0.2, 0.7])
  run = lambda c, p: jax.jit(FlowNetwork(c).apply)(p, latent, t, **feats)
  scan_cfg = dataclasses.replace(cfg, scan_layers=True)
  stacked = layout.stack_layers(params, scan_cfg)
  assert stacked['params']['joint_blocks']['latent_block']['qkv']['kernel'].shape[:2] == (2, 2)  # (layers, ears)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(mmaudio.init_params(scan_cfg)))
  assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(np.shape, stacked)
  assert rel_err(run(scan_cfg, stacked), run(cfg, params)) < 1e-6
  jax.tree.map(np.testing.assert_array_equal, layout.unstack_layers(stacked, scan_cfg), params)


def test_remat_gives_the_same_gradients():
  cfg = _tiny_binaural(depth=3, fused_depth=1)
  params, latent, feats = _inputs(cfg)
  t = jnp.array([0.2, 0.7])
  loss = lambda c: (lambda p: jnp.sum(FlowNetwork(c).apply(p, latent, t, **feats) ** 2))
  plain = jax.jit(jax.grad(loss(cfg)))(params)
  remat = jax.jit(jax.grad(loss(dataclasses.replace(cfg, remat_policy='full'))))(params)
  for (path, got), ref in zip(jax.tree_util.tree_flatten_with_path(remat)[0], jax.tree.leaves(plain)):
    if np.any(ref):
      assert rel_err(got, ref) < 1e-5, jax.tree_util.keystr(path)
    else:  # unused in this call (null conditions, latent stats, the pre-only block's dropped queries)
      assert not np.any(got), jax.tree_util.keystr(path)


@pytest.mark.parametrize('joint_mode', ['concat', 'sequential'])
def test_ears_interact_and_spacetime_is_per_ear(joint_mode):
  cfg = _tiny_binaural(joint_mode=joint_mode)
  params, latent, feats = _inputs(cfg)
  t = jnp.array([0.3, 0.6])
  apply = jax.jit(FlowNetwork(cfg).apply)
  out = apply(params, latent, t, **feats)
  # Changing only the right ear's input changes the left ear's output: the ears attend to each other.
  moved = apply(params, latent.at[:, 1].add(1.0), t, **feats)
  assert float(jnp.abs(moved[:, 0] - out[:, 0]).max()) > 1e-3
  # The spacetime condition differs per ear (ear position embeddings and queries).
  cond = jax.jit(lambda p, f: FlowNetwork(cfg).apply(p, **f, method=FlowNetwork.preprocess_conditions))(params, feats)
  assert cond.pe_c.shape == (2, 2, 43, 24)
  assert float(jnp.abs(cond.pe_c[:, 0] - cond.pe_c[:, 1]).max()) > 1e-3
  # ...and the PE features matter.
  other = apply(params, latent, t, **(feats | {'pe_f': feats['pe_f'] + 1.0}))
  assert float(jnp.abs(other - out).max()) > 1e-3


def test_fresh_spacetime_projection_is_zero():
  cfg = _tiny_binaural()
  params = fresh_params(cfg)['params']
  assert not np.any(params['spacetime']['out_proj']['kernel']) and not np.any(params['spacetime']['out_proj']['bias'])
  assert params['audio_input_proj_conv']['kernel'].shape[0] == 2  # per-ear branch weights


def test_other_duration_builds_tables_for_its_lengths():
  cfg = _tiny_binaural(latent_seq_len=None, clip_seq_len=None, sync_seq_len=None, sample_rate=16000,
                       hop_length=256, duration_s=3.0)
  lens = cfg.seq_lens()
  assert (lens.latent, lens.clip, lens.sync, lens.pe) == (94, 24, 64, 6)
  params, latent, feats = _inputs(cfg, 1)
  out = jax.jit(FlowNetwork(cfg).apply)(params, latent, jnp.array([0.5]), **feats)
  assert out.shape == (1, 2, 94, 10) and bool(jnp.isfinite(out).all())


def test_bad_feature_shapes_name_expected_and_got():
  cfg = _tiny_binaural()
  params, latent, feats = _inputs(cfg)
  model = FlowNetwork(cfg)
  t = jnp.array([0.1, 0.2])
  with pytest.raises(ValueError, match=r'clip_f: expected shape \(2, 9, 36\).*got \(2, 8, 36\)'):
    model.apply(params, latent, t, **(feats | {'clip_f': feats['clip_f'][:, :8]}))
  with pytest.raises(ValueError, match=r'latent: expected shape \(2, 2, 43, 10\)'):
    model.apply(params, latent[:, :1], t, **feats)
  with pytest.raises(ValueError, match='pe_f'):
    model.apply(params, latent, t, **(feats | {'pe_f': None}))
  with pytest.raises(ValueError, match=r't: expected shape \(2,\)'):
    model.apply(params, latent, t[:1], **feats)
  with pytest.raises(ValueError, match='unknown model config keys'):
    network_config({'latent_dim': 1, 'bogus': 2})
  with pytest.raises(ValueError, match='joint_mode'):
    dataclasses.replace(cfg, joint_mode='zigzag')


def test_wrong_variant_and_corrupt_checkpoints_give_clear_errors(tmp_path):
  with pytest.raises(CheckpointError, match=r'missing.*clip_input_proj\.1\.w1\.weight.*unexpected.*clip_input_proj\.2'):
    mmaudio.load_mmaudio(fixture_path('mmaudio_net', 'tiny_v2_state.safetensors'), tiny_config('tiny_v1'))
  with pytest.raises(CheckpointError, match='mis-shaped'):
    mmaudio.load_mmaudio(fixture_path('mmaudio_net', 'tiny_v1_state.safetensors'),
                         dataclasses.replace(tiny_config('tiny_v1'), num_heads=4))
  with pytest.raises(CheckpointError, match='matches no MMAudio preset'):
    mmaudio.load_mmaudio(fixture_path('mmaudio_net', 'tiny_v1_state.safetensors'))
  broken = tmp_path / 'broken.pth'
  broken.write_bytes(fixture_path('mmaudio_net', 'tiny_v1_state.pth').read_bytes()[:100_000])
  with pytest.raises(CheckpointError, match='broken.pth'):
    mmaudio.load_mmaudio(broken, tiny_config('tiny_v1'))
  stale = tmp_path / 'stale.safetensors'  # old checkpoints carry non-persistent buffers: dropped
  from visaudio_jax.convert.torch_io import read_state_dict
  state = read_state_dict(fixture_path('mmaudio_net', 'tiny_v1_state.safetensors'))
  write_safetensors(state | {'latent_rot': np.zeros((1, 43, 6, 2, 2), np.float32),
                             't_embed.freqs': np.zeros(128, np.float32)}, stale)
  mmaudio.load_mmaudio(stale, tiny_config('tiny_v1'))


@pytest.mark.parametrize('lq,lk', [(7, 7), (8, 9), (9, 8)])
def test_fused_attention_path_with_bias_and_odd_lengths_equals_reference(lq, lk):
  """The padding that lets cuDNN take the binaural joint attention (odd length, logit bias)."""
  from visaudio_jax.model.layers import attention
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, lq, 3, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, lk, 3, 8)), jnp.float32) for _ in range(2))
  bias = jnp.asarray(rng.standard_normal((3, lq, lk)), jnp.float32)
  ref = attention(q, k, v, 'reference', 'highest', bias)
  got = attention(q, k, v, 'xla', 'highest', bias)
  assert got.shape == ref.shape and rel_err(got, ref) < 1e-5


def test_bfloat16_compute_tracks_float32():
  cfg = _tiny_binaural()
  params, latent, feats = _inputs(cfg)
  t = jnp.array([0.3, 0.8])
  ref = jax.jit(FlowNetwork(cfg).apply)(params, latent, t, **feats)
  got = jax.jit(FlowNetwork(dataclasses.replace(cfg, dtype='bfloat16')).apply)(params, latent, t, **feats)
  assert got.dtype == jnp.bfloat16
  assert rel_err(got, ref) < 5e-2
