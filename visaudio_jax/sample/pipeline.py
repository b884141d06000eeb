"""The sampling pipeline: videos (+ captions) -> binaural waveforms with a trained model, from Python
as from `sample.py`:

    pipe = Pipeline.from_checkpoint('runs/tiny')            # a run's latest step, its EMA
    waves = pipe(['a.mp4', 'b.mp4'], ['a dog barks', ''])  # [(2, samples) float32, ...]

Each video is probed (its duration fixes its windows, `windows.plan_windows`), decoded once
(`encoders.video.iter_windows`) and run through the conditioning encoders window by window on a
worker thread, while the device samples the previous batch (`sampler.Sampler`). The trainer's
evaluators use the same `Sampler` on pre-extracted features (`sample_features`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from visaudio_jax import components
from visaudio_jax.encoders.features import STREAM_FEATURES, text_features
from visaudio_jax.encoders.tokenizer import ClipTokenizer
from visaudio_jax.encoders.video import iter_windows
from visaudio_jax.model import sharding
from visaudio_jax.model.config import network_config
from visaudio_jax.model.network import feature_shapes, init_variables
from visaudio_jax.sample.media import probe_video
from visaudio_jax.sample.sampler import Job, Result, SampleOptions, Sampler, balanced_batch
from visaudio_jax.sample.windows import WindowPlan, plan_windows


@dataclasses.dataclass(frozen=True)
class Weights:
  """Where a pipeline's params came from, for summaries."""
  source: str  # a path, or 'fresh init'
  params: str  # 'ema <name>' | 'raw' | 'seed N (untrained)' | 'MMAudio checkpoint'
  step: int | None = None


def load_weights(config: ml_collections.ConfigDict, checkpoint: str | None, which: str = 'ema'
                 ) -> tuple[Any, Weights]:
  """The network's 'params' collection from a run directory (its latest step or one
  `checkpoints/<step>`; `which` 'ema' (the EMA `config.sample.ema` names) or 'raw'), an MMAudio
  `.pth`/`.safetensors` (one set of weights, whatever `which`; made binaural when the config is), or, with no checkpoint, fresh seeded
  weights (benchmarks, smoke tests)."""
  if which not in ('ema', 'raw'):
    raise ValueError(f"params must be 'ema' or 'raw', got {which!r}")
  if not checkpoint:
    _, variables = components.network_params(config, None)
    return variables['params'], Weights('fresh init', f'seed {config.seed} (untrained)')
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f'{checkpoint}: no such file or directory (expected a train.py workdir, '
                            '<workdir>/checkpoints/<step> or an MMAudio .pth/.safetensors)')
  if os.path.isdir(checkpoint):
    net = network_config(config.model)
    abstract = jax.eval_shape(lambda: init_variables(net))['params']
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.meta.unbox(abstract))
    ema = SampleOptions.from_block(config.get('sample')).ema if which == 'ema' else ''
    if which == 'ema' and not ema:
      raise ValueError(f'{checkpoint}: --params=ema but config.sample.ema is empty; name an EMA or use --params=raw')
    params = components.restore_run_params(checkpoint, abstract, ema)
    _, step = components.run_checkpoint(checkpoint)
    return params, Weights(checkpoint, f'ema {ema}' if ema else 'raw', step)
  _, variables = components.network_params(config, checkpoint)  # MMAudio releases its EMA weights
  return variables['params'], Weights(checkpoint, 'MMAudio checkpoint')


class Pipeline:
  """A model ready to sample: config, params, the conditioning encoders and the `Sampler`."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any, weights: Weights | None = None,
               mesh: jax.sharding.Mesh | None = None):
    self.config, self.weights = config, weights or Weights('given', 'given')
    self.options = SampleOptions.from_block(config.get('sample'))
    self.net = network_config(config.model)
    mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices=jax.local_devices())
    self.sampler = Sampler.from_config(config, mesh)
    self.params = self.sampler.place_params(params)
    self._encoders = None  # loaded on first use: feature-only callers never need them
    self._tokenizer = ClipTokenizer()

  @classmethod
  def from_checkpoint(cls, checkpoint: str | None, config: ml_collections.ConfigDict | None = None,
                      which: str = 'ema', mesh: jax.sharding.Mesh | None = None) -> 'Pipeline':
    """A run directory (its stored config unless `config` is given), an MMAudio checkpoint file
    (`config` required: the file has none) or None (fresh seeded weights of `config`)."""
    if config is None:
      if not (checkpoint and os.path.isdir(checkpoint)):
        raise ValueError(f'{checkpoint}: only a run directory carries its config; pass one (e.g. configs/large_44k_v2.py)')
      config = components.run_config(checkpoint)
    params, weights = load_weights(config, checkpoint, which)
    return cls(config, params, weights, mesh)

  # ---- conditioning -------------------------------------------------------------------------------

  @property
  def encoders(self) -> tuple[Any, dict]:
    if self._encoders is None:
      self._encoders = components.encoders_from_config(self.config.encoders, self.config.seed)
    return self._encoders

  @property
  def window_s(self) -> float:
    return self.options.window_s or self.net.duration_s

  def plan(self, duration_s: float) -> WindowPlan:
    codec = self.sampler.codec_cfg
    return plan_windows(duration_s, codec.sample_rate, codec.samples_per_latent, self.window_s,
                        self.options.overlap_s or self.window_s / 4)

  def text_features(self, caption: str) -> np.ndarray:
    """(text_len, text_dim) CLIP text states of one caption."""
    cfg, params = self.encoders
    tokens = self._tokenizer([caption], context_length=cfg.clip.context_length)
    return np.asarray(text_features(cfg, params['clip'], jax.numpy.asarray(tokens)))[0]

  def video_features(self, video: str | os.PathLike, caption: str, plan: WindowPlan) -> list[dict[str, np.ndarray]]:
    """Every window's features {clip_f, sync_f, text_f[, pe_f]} (no batch axis), one decode of the video."""
    cfg, params = self.encoders
    net = self.sampler.network(plan.window_s)
    shapes = feature_shapes(net)
    text = self.text_features(caption)
    out: list[dict | None] = [None] * plan.num_windows
    starts = [plan.start_s(k) for k in range(plan.num_windows)]
    for k, frames in iter_windows(video, [cfg.fps(s) for s in cfg.streams], plan.window_s, starts, pad=True):
      feats = {'text_f': text}
      for stream, x in zip(cfg.streams, frames):
        if stream == 'pe' and not net.spacetime.enabled:
          continue
        feats[f'{stream}_f'] = np.asarray(STREAM_FEATURES[stream](cfg, params[stream], jax.numpy.asarray(x[None])))[0]
      for name, shape in shapes.items():
        if name != 'latent' and feats[name].shape != shape:
          raise ValueError(f'{video}: window {k} gives {name} {feats[name].shape}, the network needs {shape} '
                           f'(encoders preset {self.config.encoders.preset!r})')
      out[k] = feats
    return out

  def random_features(self, clip_id: str, plan: WindowPlan) -> list[dict[str, np.ndarray]]:
    """Seeded stand-in features of the right shapes (benchmarks without encoders or videos)."""
    rng = np.random.default_rng([self.config.seed, plan.num_windows, len(clip_id)])
    shapes = feature_shapes(self.sampler.network(plan.window_s))
    return [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items() if k != 'latent'}
            for _ in range(plan.num_windows)]

  def negative_text_f(self) -> np.ndarray | None:
    return self.text_features(self.options.negative_prompt) if self.options.negative_prompt else None

  # ---- generation ---------------------------------------------------------------------------------

  def video_job(self, clip_id: str, video: str | os.PathLike, caption: str = '', duration_s: float | None = None) -> Job:
    """A clip to generate from a video file (probed here unless its duration is given)."""
    duration = probe_video(video).duration_s if duration_s is None else duration_s
    plan = self.plan(duration)
    return Job(clip_id, plan, lambda: self.video_features(video, caption, plan))

  def generate(self, jobs: Sequence[Job], seed: int = 0, batch: int | None = None,
               on_window: Callable[[int], None] | None = None) -> Iterator[Result]:
    """Results as clips finish (failed clips carry their error)."""
    return self.sampler.run(self.params, jobs, batch or self.options.batch_size, seed,
                            negative_text_f=self.negative_text_f(), on_window=on_window)

  def __call__(self, videos: Sequence[str | os.PathLike], captions: Sequence[str] | None = None,
               seed: int = 0, batch: int | None = None) -> list[np.ndarray]:
    """(E, samples) waveforms at the codec's rate, one per video, as long as the video; raises on
    the first clip that fails."""
    captions = list(captions) if captions is not None else [''] * len(videos)
    if len(captions) != len(videos):
      raise ValueError(f'{len(videos)} videos but {len(captions)} captions')
    if not self.sampler.makes_sound:
      raise ValueError('the codec has no weights (codec.vae_ckpt, codec.vocoder_ckpt): no waveforms')
    jobs = [self.video_job(f'{i}:{os.fspath(v)}', v, c) for i, (v, c) in enumerate(zip(videos, captions))]
    waves = {}
    for result in self.generate(jobs, seed, batch):
      if result.error is not None:
        raise result.error
      waves[result.job.id] = result.wave
    return [waves[job.id] for job in jobs]


def sample_features(sampler: Sampler, params: Any, clips: Mapping[str, np.ndarray], seed: int,
                    batch: int | None = None) -> np.ndarray:
  """(K, E, L) waveforms of pre-extracted clips (the trainer's held-out shards: 'id', 'clip_f', ...,
  'audio' for the length), each one window of the model's duration; noise per (seed, id); by default
  in `balanced_batch`es."""
  if not sampler.makes_sound:
    raise ValueError('the codec has no weights (codec.vae_ckpt, codec.vocoder_ckpt): no waveforms')
  ids = [x.decode() if isinstance(x, bytes) else str(x) for x in clips['id']]
  if len(set(ids)) != len(ids):
    raise ValueError('sample_features: clip ids repeat; draw again with another seed instead')
  codec = sampler.codec_cfg
  length = clips['audio'].shape[-1]
  plan = WindowPlan(length, codec.sample_rate, codec.samples_per_latent, sampler.net.seq_lens().latent,
                    sampler.net.duration_s, (0,))
  rows = {name: i for i, name in enumerate(ids)}

  def job(i):
    return Job(ids[i], plan, lambda: [{k: clips[k][i] for k in ('clip_f', 'sync_f', 'text_f', 'pe_f') if k in clips}])

  waves = [None] * len(ids)
  for result in sampler.run(params, [job(i) for i in range(len(ids))], batch or balanced_batch(len(ids)), seed):
    if result.error is not None:
      raise result.error
    waves[rows[result.job.id]] = result.wave
  return np.stack(waves)
