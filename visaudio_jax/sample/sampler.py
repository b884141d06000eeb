"""The device side of sampling: clips' features -> binaural waveforms, in fixed-shape batches sharded
over a mesh, any length through overlapping windows.

One jitted program per (batch, window shape) does the whole window: per-clip noise, the guided ODE
with the previous window's latents inpainted over the overlap, and the codec's decoder. Batches are
filled continuously: a slot whose clip has finished takes the next clip, so clips of different lengths
share batches and the device never waits for the longest clip of a group. Each clip's noise comes
from (seed, clip id, window index) alone, so its output does not depend on the batch size, its batch
position, padding or the device count.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import time
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import numpy as np

from visaudio_jax import components
from visaudio_jax.audio import codec as codec_lib
from visaudio_jax.model import flow_matching as fm
from visaudio_jax.model import sharding
from visaudio_jax.model.config import NetworkConfig, network_config
from visaudio_jax.model.network import FlowNetwork, feature_shapes
from visaudio_jax.sample.windows import WindowPlan, stitch

FEATURES = ('clip_f', 'sync_f', 'text_f', 'pe_f')


def balanced_batch(count: int, max_batch: int = 16) -> int:
  """The batch size that splits `count` clips into the fewest batches of at most `max_batch`, all of
  one size (the last padded): one compiled shape, and little padding (18 clips -> 2 x 9, not 16 + 2)."""
  return -(-count // -(-count // max_batch))


def clip_hash(clip_id: str) -> int:
  """A stable 31-bit hash of a clip id (Python's `hash` of a str changes between processes)."""
  return int.from_bytes(hashlib.blake2b(clip_id.encode(), digest_size=4).digest(), 'little') >> 1


def noise_key(seed: int, clip_id: str, window: int) -> jax.Array:
  """The key of one window's initial noise: fold_in(fold_in(key(seed), hash(id)), window)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), clip_hash(clip_id)), window)


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """A config file's `sample` block (configs/common.py `sample()` writes these defaults)."""
  batch_size: int = 8  # clips per batch, over all local devices
  negative_prompt: str = ''  # text of the unconditional branch ('' = the learned empty string)
  ema: str = 'sigma_rel_0p05'  # which EMA of a run's checkpoint to sample ('' = the raw params)
  window_s: float = 0.0  # long videos: window length (0 = the model's duration_s)
  overlap_s: float = 0.0  # ...overlap between consecutive windows, at least (0 = a quarter window)
  release_t: float = 0.9  # ...the overlap is inpainted while t < release_t
  audio_codec: str = 'aac'  # the muxed video's audio: 'aac' | 'flac' | 'pcm_s16le'

  @classmethod
  def from_block(cls, block: Any) -> 'SampleOptions':
    """A config's `sample` block; fields it lacks (a run saved by an older version) keep the defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(block or {}).items() if k in names})


@dataclasses.dataclass
class Job:
  """One clip: its id, its windows, and a function giving each window's features (host arrays
  without a batch axis); `features` runs on a worker thread ahead of the device."""
  id: str
  plan: WindowPlan
  features: Callable[[], list[dict[str, np.ndarray]]]


@dataclasses.dataclass
class Result:
  """A finished clip: (E, num_samples) waveform, or the error that stopped it."""
  job: Job
  wave: np.ndarray | None = None
  latents: list[np.ndarray] | None = None  # per window (E, N, C)
  window_waves: list[np.ndarray] | None = None  # per window (E, N * samples per latent), before stitching
  error: Exception | None = None
  seconds: float = 0.0  # wall time from the clip's first batch to its last (sharing batches with others)


@dataclasses.dataclass
class _Slot:
  job: Job
  features: list[dict[str, np.ndarray]]
  window: int = 0
  waves: list = dataclasses.field(default_factory=list)
  latents: list = dataclasses.field(default_factory=list)
  started: float = dataclasses.field(default_factory=time.perf_counter)


class Sampler:
  """Network + flow-matching settings + codec, jitted per window shape on `mesh` (all local devices
  along 'data' by default). Params are placed by the logical axis `rules` (replicated when the mesh
  has only a data axis; FSDP-sharded when it has an 'fsdp' axis and the rules use it)."""

  def __init__(self, net: NetworkConfig, flow: fm.FlowMatchingConfig, codec_cfg: codec_lib.CodecConfig,
               codec_params: dict | None, *, mesh: jax.sharding.Mesh | None = None, rules=(),
               release_t: float = 0.9):
    codec_lib.check_matches_network(codec_cfg, net)
    self.net, self.flow, self.release_t = net, flow, float(release_t)
    self.codec_cfg, self.codec_params = codec_cfg, codec_params
    self.mesh = mesh or sharding.make_mesh((-1, 1, 1), devices=jax.local_devices())
    self.rules = [tuple(r) for r in rules]
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = jax.NamedSharding(self.mesh, jax.P())
    self.param_shardings = nn.logical_to_mesh_sharding(sharding.logical_specs(net), self.mesh, self.rules)['params']
    self._codec_on_mesh = None
    self._programs: dict[tuple[float, float], Callable] = {}  # (window duration, release_t) -> jitted program

  @classmethod
  def from_config(cls, config: Any, mesh: jax.sharding.Mesh | None = None) -> 'Sampler':
    """An experiment config's network, flow matching, codec (loaded), sample options and axis rules."""
    codec_cfg, codec_params = components.load_codec(config.codec)
    return cls(network_config(config.model), fm.flow_config(config.flow), codec_cfg, codec_params, mesh=mesh,
               rules=config.logical_axis_rules, release_t=SampleOptions.from_block(config.get('sample')).release_t)

  @property
  def makes_sound(self) -> bool:
    """False for a VAE codec without weights: it cannot turn latents into sound."""
    return self.codec_params is not None

  @property
  def data_shards(self) -> int:
    return self.mesh.shape['data'] * self.mesh.shape['fsdp']

  def batch_size(self, batch: int) -> int:
    """`batch` rounded up to a multiple of the devices the batch is split over."""
    return -(-max(1, batch) // self.data_shards) * self.data_shards

  def network(self, duration_s: float) -> NetworkConfig:
    """The network at another duration: same params, its own sequence lengths."""
    if duration_s == self.net.duration_s:
      return self.net
    if self.net.latent_seq_len or self.net.clip_seq_len or self.net.sync_seq_len:
      raise ValueError(f'the model pins its sequence lengths (latent_seq_len, ...): it samples '
                       f'{self.net.duration_s} s windows only, not {duration_s} s')
    return dataclasses.replace(self.net, duration_s=float(duration_s))

  def place_params(self, params: Any) -> Any:
    """The network's 'params' collection on the mesh (a no-op when it is already placed so)."""
    return jax.device_put(params, self.param_shardings)

  def _program(self, duration_s: float) -> Callable:
    key = (duration_s, self.release_t)
    if key not in self._programs:
      self._programs[key] = self._build_program(*key)
    return self._programs[key]

  def _build_program(self, duration_s: float, release_t: float) -> Callable:
    model = FlowNetwork(self.network(duration_s))
    latent_shape = feature_shapes(model.cfg)['latent']
    decode = self.codec_params is not None

    def run(params, codec_params, feats, noise, known, known_mask, negative_text_f):
      # noise: (B, 3) int32 rows (seed, clip hash, window) -> per-clip keys -> (B, E, N, C)
      keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(jax.random.key(r[0]), r[1]), r[2]))(noise)
      x0 = jax.vmap(lambda k: jax.random.normal(k, latent_shape))(keys)
      x0 = fm.correlate_ears(x0, self.flow.ear_noise_correlation)
      latents = fm.generate(model, {'params': params}, feats, x0, self.flow, negative_text_f,
                            known=known, known_mask=known_mask, release_t=release_t)
      waves = codec_lib.decode_binaural(self.codec_cfg, codec_params, latents) if decode else None
      return latents, waves

    batch = self.batch_sharding
    return jax.jit(run, in_shardings=(self.param_shardings, self.replicated, batch, batch, batch, batch, batch),
                   out_shardings=(batch, batch))

  def sample_batch(self, params: Any, duration_s: float, feats: dict[str, np.ndarray], noise: np.ndarray,
                   known: np.ndarray, known_mask: np.ndarray, negative_text_f: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """One batch of windows of one shape -> host (latents (B, E, N, C), waves (B, E, L) or None)."""
    if self._codec_on_mesh is None and self.codec_params is not None:
      self._codec_on_mesh = jax.device_put(self.codec_params, self.replicated)
    latents, waves = self._program(float(duration_s))(
        params, self._codec_on_mesh, feats, noise, known, known_mask, negative_text_f)
    return np.asarray(latents), None if waves is None else np.asarray(waves)

  def run(self, params: Any, jobs: Iterable[Job], batch: int, seed: int = 0, *,
          negative_text_f: np.ndarray | None = None, prefetch: int | None = None,
          on_window: Callable[[int], None] | None = None) -> Iterator[Result]:
    """Generate every job; yields a Result per clip as it finishes (or fails), in no fixed order.

    Jobs are grouped by window shape (a shape compiles once); within a group, `batch` slots (rounded
    up to the device count) are refilled as clips finish, empty slots padded with a copy of a live
    one. Job features are computed `prefetch` jobs ahead on worker threads while the device works.
    `negative_text_f` (text_len, text_dim): the unconditional branch's text instead of the empty
    string's. `on_window(n)` is called after each batch with the windows it finished.
    """
    params = self.place_params(params)
    batch = self.batch_size(batch)
    groups = collections.defaultdict(list)
    for job in jobs:
      groups[job.plan.window_s].append(job)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix='sample-features') as pool:
      for duration_s, group in groups.items():
        yield from self._run_group(params, duration_s, group, batch, seed, negative_text_f, pool,
                                   prefetch or 2 * batch, on_window)

  def _run_group(self, params, duration_s, group, batch, seed, negative_text_f, pool, prefetch, on_window):
    queue = collections.deque((job, None) for job in group)
    ahead = collections.deque()

    def refill():
      while queue and len(ahead) < prefetch:
        job, _ = queue.popleft()
        ahead.append((job, pool.submit(job.features)))

    slots: list[_Slot | None] = [None] * batch
    refill()
    while True:
      for i in range(batch):
        while slots[i] is None and ahead:
          job, future = ahead.popleft()
          refill()
          try:
            features = future.result()
            if len(features) != job.plan.num_windows:
              raise ValueError(f'{len(features)} windows of features for {job.plan.num_windows} planned')
            slots[i] = _Slot(job, features)
          except Exception as e:  # noqa: BLE001 -- a bad clip is reported, the others go on
            yield Result(job, error=e)
      live = [i for i, s in enumerate(slots) if s is not None]
      if not live:
        return
      rows = [slots[i] if slots[i] is not None else slots[live[0]] for i in range(batch)]
      feats = {k: np.stack([r.features[r.window][k] for r in rows]) for k in FEATURES if k in rows[0].features[0]}
      noise = np.asarray([(seed % 2**31, clip_hash(r.job.id), r.window) for r in rows], np.int32)
      mask = np.stack([r.job.plan.known_mask(r.window) for r in rows])
      shape = (len(rows),) + feature_shapes(self.network(duration_s))['latent']
      known = np.zeros(shape, np.float32)
      for b, r in enumerate(rows):
        if r.window:
          known[b] = r.job.plan.known_latents(r.window, r.latents[-1])
      neg = None if negative_text_f is None else np.broadcast_to(negative_text_f, feats['text_f'].shape)
      latents, waves = self.sample_batch(params, duration_s, feats, noise, known, mask, neg)
      for i in live:
        slot = slots[i]
        slot.latents.append(latents[i])
        slot.waves.append(None if waves is None else waves[i])
        slot.window += 1
        if slot.window == slot.job.plan.num_windows:
          slots[i] = None
          yield Result(slot.job, wave=None if waves is None else stitch(slot.job.plan, slot.waves),
                       latents=slot.latents, window_waves=slot.waves, seconds=time.perf_counter() - slot.started)
      if on_window:
        on_window(len(live))
