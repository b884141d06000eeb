"""Sampling during and after training: held-out clips -> binaural wav through the config's codec ->
spatial metrics against their references (`eval/evaluate.py`), logged to TensorBoard.

`final` is the CPU demo's acceptance check: on held-out clips whose true source is clearly on one side,
the share whose generated broadband ILD points to that side, printed beside the untrained model, the
mono-duplicate baseline and the reference itself.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax.audio import codec as codec_lib
from visaudio_jax.audio.wav import write_wav
from visaudio_jax.data import loader
from visaudio_jax.eval import evaluate as evaluate_lib
from visaudio_jax.eval import spatial
from visaudio_jax.model import flow_matching as fm

FEATURES = ('clip_f', 'sync_f', 'text_f', 'pe_f')


@functools.lru_cache(maxsize=4)
def _sampler(model, flow):
  return fm.make_sampler(model, flow)


@functools.lru_cache(maxsize=4)
def _codec(preset: str, vae_ckpt: str, vocoder_ckpt: str):
  import ml_collections
  return codec_lib.load_codec(ml_collections.ConfigDict(dict(preset=preset, vae_ckpt=vae_ckpt,
                                                             vocoder_ckpt=vocoder_ckpt)))


def held_out(config, split: str, count: int) -> dict[str, np.ndarray]:
  """The first `count` clips of a split with audio (unshuffled, so every evaluation sees the same)."""
  directory = os.path.join(config.data.dir, split)
  it = iter(loader.make_dataset(directory, split, None, 1, 0, shuffle=False, num_epochs=1))
  clips = [b for _, b in zip(range(count), it)]
  if not clips:
    raise ValueError(f'{directory}: no clips to evaluate')
  if 'audio' not in clips[0]:
    raise ValueError(f'{directory}: split {split!r} stores no audio; extract it with --with_audio to evaluate')
  return {k: np.concatenate([c[k] for c in clips]) for k in clips[0]}


def eval_params(state, name: str):
  """The EMA called `name` ('' = the raw params)."""
  if not name:
    return state.params
  if name not in state.ema:
    raise ValueError(f'eval.ema={name!r}: the state has EMAs {sorted(state.ema)}')
  return state.ema[name]


def balanced_batch(count: int, max_batch: int = 16) -> int:
  """The batch size that splits `count` clips into the fewest batches of at most `max_batch`, all of
  one size (the last padded): one compiled shape, and little padding (18 clips -> 2 x 9, not 16 + 2)."""
  return -(-count // -(-count // max_batch))


def generate_waves(program, params, clips: dict, seed: int, batch: int | None = None) -> np.ndarray | None:
  """(K, 2, L) waveforms for the clips' features (None when the codec has no weights). Batches of
  `batch` clips (default `balanced_batch`), the last padded with repeats of the final clip; each
  batch draws its noise from fold_in(key(seed), its first index), so a clip listed twice gets two draws."""
  config = program.config
  codec_cfg, codec_params = _codec(config.codec.preset, config.codec.vae_ckpt, config.codec.vocoder_ckpt)
  if codec_params is None and codec_cfg.kind == 'vae':
    return None
  sampler = _sampler(program.model, fm.FlowMatchingConfig(**config.flow.to_dict()))
  decode = jax.jit(functools.partial(codec_lib.decode_binaural, codec_cfg))
  params = jax.device_get(params)  # sampling runs replicated on the default device
  count = len(clips['id'])
  batch = batch or balanced_batch(count)
  waves = []
  for start in range(0, count, batch):
    rows = np.minimum(np.arange(start, start + batch), count - 1)
    feats = {k: jnp.asarray(clips[k][rows]) for k in FEATURES if k in clips}
    x0 = fm.initial_noise(jax.random.fold_in(jax.random.key(seed), start), (batch,) + clips['latent_mean'].shape[1:],
                          config.flow.ear_noise_correlation)
    latents = sampler({'params': params}, feats, x0)
    waves.append(np.asarray(decode(codec_params, latents))[:count - start])
  return np.concatenate(waves)[..., :clips['audio'].shape[-1]]


def write_waves(directory: str, ids, waves: np.ndarray, sample_rate: int) -> None:
  os.makedirs(directory, exist_ok=True)
  for clip_id, wave in zip(ids, waves):
    write_wav(os.path.join(directory, f'{clip_id}.wav'), wave, sample_rate)


def periodic(program, state, step: int, workdir: str, writer) -> dict[str, float]:
  """Samples `eval.num_samples` validation clips with the eval EMA, writes them under
  <workdir>/samples/<step>/ and to TensorBoard, and returns their spatial metrics (generated only)."""
  config = program.config
  clips = held_out(config, config.data.eval_split, int(config.eval.num_samples))
  waves = generate_waves(program, eval_params(state, config.eval.ema), clips, seed=step)
  if waves is None:
    return {}
  sr = int(clips['sample_rate'][0])
  if jax.process_index() == 0:
    write_waves(os.path.join(workdir, 'samples', f'{step:08d}'), clips['id'], waves, sr)
    writer.write_audios(step, {f'sample_{i}': np.moveaxis(w, 0, -1)[None] for i, w in enumerate(waves[:4])},
                        sample_rate=sr)
  result = evaluate_lib.evaluate_arrays(waves, clips['audio'], sr, clips['id'], clips.get('source_azimuth_deg'),
                                        baselines=False)
  return {f'sample_{k}': v['generated'] for k, v in result['metrics'].items() if v['generated'] is not None}


def clip_ild_db(waves: np.ndarray, cfg: spatial.SpatialConfig = spatial.SPATIAL_16K) -> np.ndarray:
  """(K, 2, L) -> (K,) broadband ILD in dB, mean over the clip's active frames (0 when silent)."""
  feats = jax.jit(functools.partial(spatial.frame_features, cfg))(jnp.asarray(waves))
  active = np.asarray(feats['active'], np.float64)
  ild = np.asarray(feats['ild'], np.float64)
  return np.where(active.sum(-1) > 0, (ild * active).sum(-1) / np.maximum(active.sum(-1), 1), 0.0)


def side_agreement(ild_db: np.ndarray, side: np.ndarray) -> float | None:
  """Share of clips whose ILD sign is the true side (+1 left, -1 right); an ILD of exactly 0 (no
  lateral cue at all, e.g. a mono duplicate) counts as a coin flip, 1/2. None without clips."""
  if not len(side):
    return None
  return float(np.mean(np.where(ild_db == 0, 0.5, np.sign(ild_db) == side)))


def lateral_sides(azimuth_deg: np.ndarray, lateral_deg: float) -> tuple[np.ndarray, np.ndarray]:
  """(K, T) source azimuths (+90 = left) -> (clearly lateral (K,) bool, side (K,) +1 left / -1 right):
  lateral when every point is at least `lateral_deg` off the median plane, all on one side (by the
  lateral angle, so a source behind counts like its mirror in front)."""
  sin_az = np.sin(np.deg2rad(azimuth_deg))
  lateral = np.all(np.abs(sin_az) >= np.sin(np.deg2rad(lateral_deg)), -1) & np.all(
      np.sign(sin_az) == np.sign(sin_az[:, :1]), -1)
  return lateral, np.sign(sin_az[:, 0])


def final(program, state, workdir: str, untrained_params=None) -> dict:
  """The demo's acceptance numbers on `eval.final_split`: ILD side agreement on clearly lateral clips
  (every azimuth point at least `eval.lateral_deg` off the median plane, all on one side)
  for the trained model (eval EMA), the untrained model, the mono duplicate and the reference; the
  full `evaluate` report of the trained model in <workdir>/final_eval/ (on the lateral clips only
  with `eval.final_lateral_only`).

  The untrained model (`untrained_params`, else the config's seeded init) is scored over
  `eval.untrained_draws` noise draws per clip: its zero-initialised output layer makes it return its
  noise, so its ILD sign is a coin flip per draw, and one draw on ~18 clips ranged 28-83 % over seeds."""
  from visaudio_jax.train import state as state_lib

  config = program.config
  clips = held_out(config, config.eval.final_split, int(config.eval.final_num_samples))
  if 'source_azimuth_deg' not in clips:
    return {'note': f'split {config.eval.final_split!r} stores no source azimuths: no side agreement'}
  lateral, side = lateral_sides(clips['source_azimuth_deg'], config.eval.lateral_deg)
  num_clips = len(side)
  if config.eval.final_lateral_only:  # sample (the slow part) and report only the clips scored here
    clips, side, lateral = {k: v[lateral] for k, v in clips.items()}, side[lateral], lateral[lateral]
    if not len(side):
      return {'split': config.eval.final_split, 'clips': num_clips, 'lateral_clips': 0,
              'note': f'no clip is {config.eval.lateral_deg} degrees to one side throughout'}
  sr = int(clips['sample_rate'][0])
  batch = balanced_batch(len(side))  # the untrained draws reuse the trained samples' compiled shapes
  trained = generate_waves(program, eval_params(state, config.eval.ema), clips, seed=1, batch=batch)
  if trained is None:
    return {'note': 'the codec has no weights: no waveforms to score'}
  reference = clips['audio']
  mono = np.repeat(reference.mean(1, keepdims=True), 2, axis=1)
  draws = int(config.eval.untrained_draws)
  systems = {'trained': (trained[lateral], side[lateral]), 'untrained': None,
             'mono_duplicate': (mono[lateral], side[lateral]), 'reference': (reference[lateral], side[lateral])}
  if lateral.any() and draws:  # only on the clips it is scored on: sampling is the slow part
    if untrained_params is None:
      untrained_params = state_lib.create_state(program.cfg, config, program.tx, program.shardings,
                                                program.mesh).params
    repeated = {k: np.concatenate([v[lateral]] * draws) for k, v in clips.items()}
    systems['untrained'] = (generate_waves(program, untrained_params, repeated, seed=1, batch=batch),
                            np.tile(side[lateral], draws))
  table = {name: None if s is None else side_agreement(clip_ild_db(s[0]), s[1]) for name, s in systems.items()}
  out_dir = os.path.join(workdir, 'final_eval')
  if jax.process_index() == 0:
    write_waves(os.path.join(out_dir, 'generated'), clips['id'], trained, sr)
  metrics = evaluate_lib.evaluate_arrays(trained, reference, sr, clips['id'], clips['source_azimuth_deg'])
  if jax.process_index() == 0:
    evaluate_lib.write_outputs(metrics, out_dir)
  summary = {'split': config.eval.final_split, 'clips': num_clips, 'lateral_clips': int(lateral.sum()),
             'ild_side_agreement': table,
             'scored_samples': {name: 0 if s is None else len(s[1]) for name, s in systems.items()},
             'direction_ild': metrics['metrics'].get('direction_ild', {}),
             'ild_mae': metrics['metrics'].get('ild_mae', {})}
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, 'side_agreement.json'), 'w') as f:
      json.dump(summary, f, indent=1)
  return summary
