"""Any length: a clip longer than the network's window is generated in overlapping windows.

Windows are laid on the latent frame grid: the first at frame 0, each next one `hop` frames later,
the last one moved back to end exactly at the clip's last latent frame (so every window of every clip
has the network's shape and compiles once). Each window after the first is conditioned on its
predecessor's latents over the frames they share (flow-matching inpainting, `flow_matching.inpainting`);
`stitch` then cross-fades the decoded windows over those frames. A clip no longer than the window is
one window of its own duration (the network is duration-agnostic).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class WindowPlan:
  """Where the windows of one clip lie, in latent frames of `samples_per_latent` audio samples."""
  num_samples: int  # audio samples of the clip: round(duration * sample_rate)
  sample_rate: int
  samples_per_latent: int
  window_frames: int  # N of every window
  window_s: float  # the network duration that gives N (the clip's own when it is one short window)
  starts: tuple[int, ...]  # first latent frame of each window

  @property
  def num_windows(self) -> int:
    return len(self.starts)

  def overlap(self, k: int) -> int:
    """Latent frames window k shares with window k - 1 (0 for the first)."""
    return 0 if k == 0 else self.starts[k - 1] + self.window_frames - self.starts[k]

  def start_s(self, k: int) -> float:
    return self.starts[k] * self.samples_per_latent / self.sample_rate

  def known_mask(self, k: int) -> np.ndarray:
    """(N,) 1 over the frames window k inherits from window k - 1."""
    mask = np.zeros(self.window_frames, np.float32)
    mask[:self.overlap(k)] = 1
    return mask

  def known_latents(self, k: int, previous: np.ndarray) -> np.ndarray:
    """Window k - 1's latents (..., N, C) moved onto window k's frames (zeros where unknown)."""
    shift = self.starts[k] - self.starts[k - 1]
    out = np.zeros_like(previous)
    out[..., :self.window_frames - shift, :] = previous[..., shift:, :]
    return out


def latent_frames(duration_s: float, sample_rate: int, samples_per_latent: int) -> int:
  """MMAudio's rule (`model.config.sequence_lengths`): ceil(duration * rate / samples per latent)."""
  return math.ceil(duration_s * sample_rate / samples_per_latent)


def plan_windows(duration_s: float, sample_rate: int, samples_per_latent: int, window_s: float,
                 overlap_s: float) -> WindowPlan:
  """The windows of a clip of `duration_s` for a network window of `window_s` seconds that overlap by
  at least `overlap_s` (the last window usually by more)."""
  if not duration_s > 0:
    raise ValueError(f'clip duration {duration_s} s: must be positive')
  num_samples = round(duration_s * sample_rate)
  window = latent_frames(window_s, sample_rate, samples_per_latent)
  total = math.ceil(num_samples / samples_per_latent)
  if total <= window:
    return WindowPlan(num_samples, sample_rate, samples_per_latent, latent_frames(duration_s, sample_rate,
                      samples_per_latent), duration_s, (0,))
  overlap = math.ceil(overlap_s * sample_rate / samples_per_latent)
  hop = window - overlap
  if not 0 < overlap < window:
    raise ValueError(f'window overlap {overlap_s} s must be positive and shorter than the window {window_s} s')
  starts = list(range(0, total - window, hop)) + [total - window]
  return WindowPlan(num_samples, sample_rate, samples_per_latent, window, window_s, tuple(starts))


def stitch(plan: WindowPlan, waves: list[np.ndarray]) -> np.ndarray:
  """Decoded windows (E, >= N * samples_per_latent) each -> the clip's (E, num_samples) waveform,
  cross-faded over each overlap with complementary sin^2 / cos^2 gains (they sum to 1: the windows
  agree there, having been inpainted to)."""
  if len(waves) != plan.num_windows:
    raise ValueError(f'stitch: {len(waves)} windows decoded, the plan has {plan.num_windows}')
  spl, span = plan.samples_per_latent, plan.window_frames * plan.samples_per_latent
  out = np.zeros((waves[0].shape[0], max(plan.num_samples, plan.starts[-1] * spl + span)), np.float32)
  for k, wave in enumerate(waves):
    begin = plan.starts[k] * spl
    segment = np.asarray(wave[:, :span], np.float32)
    fade = plan.overlap(k) * spl
    if fade:
      gain = np.sin(0.5 * np.pi * (np.arange(fade) + 0.5) / fade) ** 2
      out[:, begin:begin + fade] = out[:, begin:begin + fade] * (1 - gain) + segment[:, :fade] * gain
      segment = segment[:, fade:]
      begin += fade
    out[:, begin:begin + segment.shape[1]] = segment
  return out[:, :plan.num_samples]
