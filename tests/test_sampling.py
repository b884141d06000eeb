"""Sampling (visaudio_jax/sample): window plans and their cross-fade, overlap inpainting, per-clip
determinism over batch sizes and device counts, weights from a run's checkpoint (EMA vs raw), from an
imported MMAudio checkpoint, inputs, and the whole command (videos -> WAV + muxed MP4, resume,
failures)."""
import json
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from conftest import fixture_path
from mmaudio_fixtures import tiny_config
from visaudio_jax import components
from visaudio_jax.audio.wav import read_wav
from visaudio_jax.encoders.video import write_video
from visaudio_jax.model import flow_matching as fm
from visaudio_jax.model import sharding
from visaudio_jax.model.config import network_config
from visaudio_jax.model.network import FlowNetwork, feature_shapes
from visaudio_jax.sample import command, inputs
from visaudio_jax.sample.media import probe_video
from visaudio_jax.sample.pipeline import Pipeline, load_weights
from visaudio_jax.sample.sampler import Job, Sampler, noise_key
from visaudio_jax.sample.windows import plan_windows, stitch
from visaudio_jax.train import checkpoint, optim, trainer
from visaudio_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_config(steps: int = 3):
  config = tiny.get_config()
  config.model.update(depth=2, fused_depth=1)
  config.flow.num_steps = steps
  return config


def perturbed_params(config, seed: int = 0):
  """Fresh params plus noise: a fresh init's zero output layer would make every output its noise."""
  _, variables = components.network_params(config, None)
  leaves, treedef = jax.tree.flatten(variables['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves])


def random_jobs(sampler, durations, seed=0):
  rng = np.random.default_rng(seed)
  jobs = []
  for i, duration in enumerate(durations):
    plan = plan_windows(duration, 16000, 256, sampler.net.duration_s, 0.5)
    shapes = feature_shapes(sampler.network(plan.window_s))
    feats = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items() if k != 'latent'}
             for _ in plan.starts]
    jobs.append(Job(f'clip_{i}', plan, lambda f=feats: f))
  return jobs


# ---- windows --------------------------------------------------------------------------------------

def test_window_plans_cover_the_clip_on_the_latent_grid():
  plan = plan_windows(20.0, 16000, 256, 2.0, 0.5)  # 1250 latent frames, windows of 125
  assert plan.num_samples == 320_000 and plan.window_frames == 125 and plan.window_s == 2.0
  assert plan.starts[0] == 0 and plan.starts[-1] + 125 == 1250
  assert all(plan.overlap(k) >= 32 for k in range(1, plan.num_windows)) and plan.overlap(0) == 0
  assert np.diff(plan.starts[:-1]).tolist() == [93] * (plan.num_windows - 2)  # hop = 125 - ceil(0.5 * 62.5)
  mask = plan.known_mask(3)
  assert mask.sum() == plan.overlap(3) and mask[:plan.overlap(3)].all()
  previous = np.arange(125 * 2, dtype=np.float32).reshape(1, 125, 2)
  known = plan.known_latents(3, previous)
  np.testing.assert_array_equal(known[0, :plan.overlap(3)], previous[0, 93:])
  short = plan_windows(1.5, 16000, 256, 2.0, 0.5)  # one window of the clip's own duration
  assert short.starts == (0,) and short.window_s == 1.5 and short.window_frames == 94
  odd = plan_windows(2.96, 44100, 1024, 8.0, 2.0)
  assert odd.num_samples == round(2.96 * 44100) and odd.window_frames * 1024 >= odd.num_samples
  with pytest.raises(ValueError, match='overlap'):
    plan_windows(20.0, 16000, 256, 2.0, 2.0)


def test_stitch_cross_fades_to_the_exact_length():
  plan = plan_windows(5.0, 16000, 256, 2.0, 0.5)
  span = plan.window_frames * 256
  t = np.arange(plan.num_samples) / 16000
  signal = np.stack([np.sin(2 * np.pi * 3 * t), np.cos(2 * np.pi * 5 * t)]).astype(np.float32)
  windows = [signal[:, s * 256:s * 256 + span] for s in plan.starts]  # windows that agree on the overlaps
  np.testing.assert_allclose(stitch(plan, windows), signal, atol=1e-6)
  ones = [np.full((2, span), float(k)) for k in range(plan.num_windows)]
  out = stitch(plan, ones)
  assert out.shape == (2, 80_000)
  fade = slice(plan.starts[1] * 256, (plan.starts[0] + plan.window_frames) * 256)
  assert np.all(np.diff(out[0, fade]) >= 0) and 0 < out[0, fade].mean() < 1  # a monotone ramp 0 -> 1


# ---- inpainting -----------------------------------------------------------------------------------

def test_inpainting_keeps_known_frames_on_their_path_until_release():
  rng = np.random.default_rng(0)
  x0, known = (jnp.asarray(rng.standard_normal((2, 2, 6, 3)), jnp.float32) for _ in range(2))
  mask = jnp.asarray([[1, 1, 0, 0, 0, 0], [0] * 6], jnp.float32)
  constrain = fm.inpainting(x0, known, mask, release_t=0.5)
  x = jnp.zeros_like(x0)
  out = constrain(jnp.float32(0.25), x)
  np.testing.assert_allclose(out[0, :, :2], 0.75 * x0[0, :, :2] + 0.25 * known[0, :, :2], atol=1e-6)
  assert not np.any(out[0, :, 2:]) and not np.any(out[1])
  assert not np.any(constrain(jnp.float32(0.5), x))  # released


def test_a_window_continues_its_predecessor_over_the_overlap():
  """With the overlap inpainted, window 2 starts where window 1 left off: its first frames are close
  to window 1's last ones; without conditioning (release at t = 0) they are an independent draw."""
  config = micro_config(steps=8)
  params = perturbed_params(config)
  results = {}
  for release in (1.0, 0.0):
    config.sample.release_t = release
    sampler = Sampler.from_config(config, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    (result,) = sampler.run(params, random_jobs(sampler, [3.0]), batch=1)
    plan, (first, second) = result.job.plan, result.latents
    overlap = plan.overlap(1)
    shift = plan.starts[1]
    results[release] = np.abs(second[:, :overlap] - first[:, shift:shift + overlap]).mean() / np.abs(first).mean()
  assert results[1.0] < 0.2 * results[0.0], results  # measured 0.14 vs 1.40


# ---- determinism ----------------------------------------------------------------------------------

def test_each_clip_is_the_same_whatever_batch_and_device_count():
  """Noise from (seed, clip id, window): 1 device vs 8, batch 1 vs 4, padding, and mixed lengths give
  the same latents up to float32 rounding (XLA's CPU matmuls block by batch size, so the sums are not
  bitwise the same: 6e-6 measured on values ~3; a different noise draw would differ by ~1)."""
  config = micro_config()
  params = perturbed_params(config)
  one = Sampler.from_config(config, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  eight = Sampler.from_config(config, sharding.make_mesh((8, 1, 1), devices=jax.devices()[:8]))
  durations = [3.0, 2.0, 4.5]
  runs = {}
  for name, sampler, batch in (('1 device, batch 1', one, 1), ('1 device, batch 4', one, 4),
                               ('8 devices, batch 8', eight, 4)):
    runs[name] = {r.job.id: r for r in sampler.run(params, random_jobs(sampler, durations), batch=batch, seed=3)}
  base = runs['1 device, batch 1']
  assert [base[f'clip_{i}'].wave.shape[-1] for i in range(3)] == [48_000, 32_000, 72_000]
  for name, run in runs.items():
    for clip_id, result in run.items():
      for a, b in zip(result.latents, base[clip_id].latents):
        np.testing.assert_allclose(a, b, rtol=0, atol=3e-5, err_msg=f'{name}: {clip_id}')
  other_seed = {r.job.id: r for r in one.run(params, random_jobs(one, durations), batch=4, seed=4)}
  assert np.abs(other_seed['clip_0'].latents[0] - base['clip_0'].latents[0]).max() > 0.1
  assert not np.array_equal(jax.random.key_data(noise_key(0, 'a', 0)), jax.random.key_data(noise_key(0, 'a', 1)))


# ---- weights --------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A run checkpoint whose EMA differs from its raw params by +1 everywhere."""
  config = micro_config()
  net = network_config(config.model)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices=jax.devices()[:1])
  tx = optim.make_optimizer(config.optim)
  abstract, specs = state_lib.abstract_state(net, config, tx)
  shardings = state_lib.state_shardings(specs, mesh, config.logical_axis_rules)
  state = state_lib.create_state(net, config, tx, shardings, mesh)
  ema = {name: jax.tree.map(lambda p: p + 1.0, state.params) for name in state.ema}
  workdir = tmp_path_factory.mktemp('run')
  trainer.write_run_config(str(workdir), config)
  manager = checkpoint.make_manager(workdir, config)
  assert checkpoint.save(manager, 7, state.replace(step=jnp.int32(7), ema=ema),
                         iter(grain.MapDataset.range(4).to_iter_dataset()), config, force=True)
  manager.wait_until_finished()
  manager.close()
  return workdir, jax.device_get(state.params)


def test_a_run_is_sampled_with_its_ema_or_raw_params_as_asked(run_dir):
  workdir, raw = run_dir
  config = components.run_config(workdir)
  assert config.model.depth == 2 and config.sample.ema == 'sigma_rel_0p05'
  ema, how = load_weights(config, str(workdir), 'ema')
  assert how.params == 'ema sigma_rel_0p05' and how.step == 7
  params, how = load_weights(config, str(workdir / 'checkpoints' / '7'), 'raw')
  assert how.params == 'raw'
  for e, p, r in zip(jax.tree.leaves(ema), jax.tree.leaves(params), jax.tree.leaves(raw)):
    np.testing.assert_array_equal(p, r)
    np.testing.assert_array_equal(e, r + 1.0)
  pipe = Pipeline.from_checkpoint(str(workdir))  # the stored config, its EMA
  assert pipe.config.model.depth == 2
  np.testing.assert_array_equal(jax.tree.leaves(pipe.params)[0], jax.tree.leaves(ema)[0])


def test_a_missing_ema_or_another_config_is_a_clear_error(run_dir, tmp_path):
  workdir, _ = run_dir
  config = components.run_config(workdir)
  config.sample.ema = 'sigma_rel_0p2'
  with pytest.raises(ValueError, match=r"has no EMA 'sigma_rel_0p2'; its EMAs are \['sigma_rel_0p05', 'sigma_rel_0p1'\]"):
    load_weights(config, str(workdir), 'ema')
  other = micro_config()
  other.model.hidden_dim = 32
  with pytest.raises(ValueError, match='do not fit this network config'):
    load_weights(other, str(workdir), 'raw')
  with pytest.raises(FileNotFoundError, match='no finished checkpoint'):
    load_weights(other, str(tmp_path), 'raw')
  with pytest.raises(FileNotFoundError, match='no such file or directory'):
    load_weights(other, str(tmp_path / 'gone'), 'raw')


def test_sampling_from_imported_mmaudio_weights():
  """An MMAudio checkpoint (tests/fixtures/mmaudio_net/tiny_v1_state.pth, shared/fixtures/mmaudio_net)
  made binaural samples latents of the fixture net's shape."""
  config = tiny.get_config()
  fixture = tiny_config('tiny_v1')
  for key in ('latent_dim', 'clip_dim', 'sync_dim', 'text_dim', 'hidden_dim', 'depth', 'fused_depth',
              'num_heads', 'latent_seq_len', 'clip_seq_len', 'sync_seq_len', 'text_seq_len'):
    config.model[key] = getattr(fixture, key)
  params, how = load_weights(config, str(fixture_path('mmaudio_net', 'tiny_v1_state.pth')), 'ema')
  assert how.params == 'MMAudio checkpoint'
  net = network_config(config.model)
  shapes = feature_shapes(net)
  rng = np.random.default_rng(0)
  feats = {k: rng.standard_normal((2,) + s).astype(np.float32) for k, s in shapes.items() if k != 'latent'}
  x0 = fm.initial_noise(jax.random.key(0), (2,) + shapes['latent'])
  latents = fm.make_sampler(FlowNetwork(net), fm.FlowMatchingConfig(num_steps=3))({'params': params}, feats, x0)
  assert latents.shape == (2, 2, 43, 10) and np.isfinite(latents).all()


# ---- inputs ---------------------------------------------------------------------------------------

def test_inputs_from_folders_globs_manifests_and_caption_tables(tmp_path):
  for name in ('b.mp4', 'a.mov', 'notes.txt'):
    (tmp_path / name).write_bytes(b'x')
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'c.mp4').write_bytes(b'x')
  items = inputs.gather([str(tmp_path), str(tmp_path / 'sub' / '*.mp4'), str(tmp_path / 'gone.mp4')])
  assert [(i.id, bool(i.error)) for i in items] == [('a', False), ('b', False), ('c', False), ('gone', True)]
  assert 'no such file' in items[-1].error
  captions = tmp_path / 'captions.csv'
  captions.write_text('id,caption\na,rain\nb,\nzzz,orphan\n')
  items = {i.id: i for i in inputs.gather([str(tmp_path)], captions_csv=str(captions))}
  assert items['a'].caption == 'rain' and items['b'].caption == '' and not items['b'].error
  assert 'matches no video' in items['zzz'].error
  manifest = tmp_path / 'todo.csv'
  manifest.write_text('id,video,caption\none,b.mp4,a dog\ntwo,,x\n')
  one, two = inputs.gather(manifest=str(manifest))
  assert one.video == str(tmp_path / 'b.mp4') and one.caption == 'a dog' and 'no video given' in two.error
  jsonl = tmp_path / 'manifest.jsonl'  # a dataset manifest (BiAudio-mini's): its wav column is ignored
  jsonl.write_text('{"id": "x1", "video": "b.mp4", "wav": "b.wav", "caption": "a hiss"}\n')
  (x1,) = inputs.gather(manifest=str(jsonl))
  assert (x1.id, x1.video, x1.caption) == ('x1', str(tmp_path / 'b.mp4'), 'a hiss')
  with pytest.raises(ValueError, match=r"same output: 'c'"):
    inputs.gather([str(tmp_path / 'sub'), str(tmp_path / 'sub' / 'c.mp4')])
  with pytest.raises(ValueError, match='3 captions for 2 videos'):
    inputs.gather([str(tmp_path / 'a.mov'), str(tmp_path / 'b.mp4')], captions=['x', 'y', 'z'])
  assert [i.caption for i in inputs.gather([str(tmp_path / 'a.mov'), str(tmp_path / 'b.mp4')], captions=['x'])] == ['x', 'x']


# ---- the command ----------------------------------------------------------------------------------

def _video(path, seconds, fps=25, size=(48, 64)):
  frames = np.random.default_rng(0).integers(0, 256, (int(seconds * fps),) + size + (3,), np.uint8)
  write_video(path, frames, fps)
  return path


def _video_packets(path):
  import av
  with av.open(str(path)) as container:
    return [bytes(p) for p in container.demux(container.streams.video[0]) if p.size]


@pytest.mark.integration
def test_videos_become_binaural_videos_and_a_rerun_resumes(tmp_path):
  """A 3-s video (two windows), a 1.5-s one (one short window) and a broken file, with the seeded
  tiny encoders: WAVs as long as the videos to the sample, MP4s with the input's video packets and
  one stereo track, the broken clip reported; a rerun skips the finished clips."""
  clips = tmp_path / 'clips'
  clips.mkdir()
  long, short = _video(clips / 'long.mp4', 3.0), _video(clips / 'short.mp4', 1.52)
  (clips / 'broken.mp4').write_text('not a video')
  config = micro_config(steps=2)
  pipe = Pipeline(config, perturbed_params(config))
  items = inputs.gather([str(clips)], captions=['rain'])
  out = tmp_path / 'out'
  summary = command.run(pipe, items, str(out), batch=2, progress=False)
  assert (summary['generated'], summary['failed'], summary['skipped']) == (2, 1, 0)
  by_id = {c['id']: c for c in summary['clips']}
  assert 'cannot open as a video' in by_id['broken']['error']
  assert by_id['long']['windows'] == 2 and by_id['short']['windows'] == 1
  for name, video in (('long', long), ('short', short)):
    wave, rate = read_wav(out / f'{name}.wav')
    duration = probe_video(video).duration_s
    assert rate == 16000 and wave.shape == (2, round(duration * 16000))
    assert _video_packets(out / f'{name}.mp4') == _video_packets(video)
    info = probe_video(out / f'{name}.mp4')
    assert info.audio_streams == 1 and abs(info.duration_s - duration) < 1024 / 16000
  assert json.loads((out / 'summary.json').read_text())['generated'] == 2
  before = (out / 'long.wav').stat().st_mtime_ns
  again = command.run(pipe, items, str(out), batch=2, progress=False)
  assert (again['generated'], again['skipped'], again['failed']) == (0, 2, 1)
  assert (out / 'long.wav').stat().st_mtime_ns == before
  redo = command.run(pipe, [i for i in items if i.id == 'long'], str(out), batch=2, overwrite=True, progress=False)
  assert redo['generated'] == 1 and (out / 'long.wav').stat().st_mtime_ns != before


@pytest.mark.integration
def test_sample_py_on_a_run_directory_exits_nonzero_when_a_clip_fails(run_dir, tmp_path):
  workdir, _ = run_dir
  video = _video(tmp_path / 'clip.mp4', 2.0)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  cmd = [sys.executable, os.path.join(ROOT, 'sample.py'), f'--checkpoint={workdir}', f'--video={video}',
         f'--video={tmp_path / "missing.mp4"}', f'--out={tmp_path / "out"}', '--steps=2', '--params=raw',
         '--config.sample.audio_codec=flac']
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert done.returncode == 1, done.stderr[-3000:]
  assert '1 generated, 0 skipped, 1 failed' in done.stdout and 'missing.mp4: no such file' in done.stdout
  summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  assert summary['weights']['params'] == 'raw' and summary['flow']['num_steps'] == 2
  assert (tmp_path / 'out' / 'clip.mkv').exists() and (tmp_path / 'out' / 'clip.wav').exists()
