"""Video decoding (PyAV) and per-encoder frame sampling, resizing and cropping.

Frame sampling is MMAudio's `data/av_utils.read_frames` rule: for each target rate, the grid time
t_k receives the first decoded frame whose timestamp is >= t_k, where t_0 = 0 and t_{k+1} = t_k +
1 / fps is accumulated in float (so low-rate videos repeat frames and high-rate videos skip them);
frames after `duration_s` are not decoded, and each stream is then cut to int(fps * duration_s)
frames (`eval_utils.load_video`). Frames are uint8 (T, H, W, 3) RGB at the native size; `resize_frames`
makes each encoder's input on the device.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class VideoError(ValueError):
  """A video file that cannot give the requested frames."""


def sample_times(fps: float, count: int) -> np.ndarray:
  """The grid times MMAudio's reader accumulates: 0, 1/fps, 2/fps, ... (float additions)."""
  times = np.empty(count)
  t = 0.0
  for k in range(count):
    times[k] = t
    t += 1.0 / fps
  return times


def iter_windows(path: str | os.PathLike, fps: Sequence[float], duration_s: float, starts_s: Sequence[float],
                 pad: bool = False) -> Iterator[tuple[int, list[np.ndarray]]]:
  """Decode `path` once and yield (window index, one uint8 (int(fps * duration_s), H, W, 3) stream per
  rate in `fps`) for each window [start, start + duration_s) of `starts_s` (ascending), each as soon
  as it is complete, so a long video never holds more than its overlapping windows in memory.

  Every window samples its frames by MMAudio's rule from its own start. A window that runs past the
  video's end raises VideoError, unless `pad`, which repeats the last frame.
  """
  import av  # PyAV (FFmpeg); imported here so the rest of the package works without it

  path = os.fspath(path)
  wanted = [int(f * duration_s) for f in fps]
  if min(wanted) < 1:
    raise ValueError(f'{path}: duration_s={duration_s} gives no frames at {min(fps)} fps')
  starts = [float(s) for s in starts_s]
  if any(b < a for a, b in zip(starts, starts[1:])):
    raise ValueError(f'{path}: window starts must ascend, got {starts}')
  outputs = {w: [[] for _ in fps] for w in range(len(starts))}  # open windows
  next_time = {w: [0.0] * len(fps) for w in outputs}
  last_time, last_rgb = None, None

  def finish(w):
    frames = outputs.pop(w)
    result = []
    for f, stream, count in zip(fps, frames, wanted):
      if len(stream) < count:
        if not pad or not stream and last_rgb is None:
          raise VideoError(f'{path}: {len(stream)} frames at {f} fps from {starts[w]:.2f} s cover up to '
                           f'{last_time or 0:.2f} s, shorter than the requested {duration_s} s ({count} frames)'
                           '; pass pad=True to repeat the last frame')
        stream = stream + [stream[-1] if stream else last_rgb] * (count - len(stream))
      result.append(np.stack(stream))
    return w, result

  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError) as exc:
    raise VideoError(f'{path}: cannot open as a video ({exc})') from exc
  with container:
    if not container.streams.video:
      raise VideoError(f'{path}: has no video stream')
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    try:
      for frame in container.decode(stream):
        if frame.time is None:
          continue
        t = frame.time
        if t < starts[0]:
          continue
        rgb = None
        for w in list(outputs):
          tw = t - starts[w]
          if tw < 0:
            break  # later windows start later still
          if tw > duration_s or all(len(o) >= c for o, c in zip(outputs[w], wanted)):
            yield finish(w)
            continue
          for i, f in enumerate(fps):
            while tw >= next_time[w][i] and len(outputs[w][i]) < wanted[i]:
              rgb = frame.to_ndarray(format='rgb24') if rgb is None else rgb
              outputs[w][i].append(rgb)
              next_time[w][i] += 1.0 / f
        if rgb is not None:
          last_rgb = rgb
        last_time = t
        if not outputs:
          break
    except av.error.FFmpegError as exc:
      raise VideoError(f'{path}: decoding failed ({exc})') from exc
  if last_time is None:
    raise VideoError(f'{path}: no decodable frames after {starts[0]} s')
  for w in list(outputs):
    yield finish(w)


def read_frames(path: str | os.PathLike, fps: Sequence[float], duration_s: float, *, start_s: float = 0.0,
                pad: bool = False) -> list[np.ndarray]:
  """Decode `path` once into one uint8 (int(fps * duration_s), H, W, 3) stream per rate in `fps`.

  A video shorter than `duration_s` raises VideoError, unless `pad`, which repeats its last frame.
  """
  return next(iter_windows(path, fps, duration_s, [start_s], pad=pad))[1]


def resize_frames(frames: Array, size: int, mode: str) -> Array:
  """uint8 frames (..., H, W, 3) -> uint8 (..., size, size, 3), as the encoders' torchvision transforms:

  'squash': resize to size x size, ignoring the aspect ratio (CLIP bicubic, PE bilinear);
  'crop': resize the short side to `size`, then centre-crop (Synchformer).
  Bicubic for 'squash' and 'crop' alike (Keys a = -0.5 with antialiasing, torchvision's uint8
  antialiased kernel); `mode` 'squash_bilinear' uses bilinear.
  """
  h, w = frames.shape[-3:-1]
  method = 'bilinear' if mode == 'squash_bilinear' else 'bicubic'
  if mode in ('squash', 'squash_bilinear'):
    out_h, out_w = size, size
  elif mode == 'crop':
    scale = size / min(h, w)
    out_h, out_w = max(size, round(h * scale)), max(size, round(w * scale))
  else:
    raise ValueError(f"resize mode must be 'squash', 'squash_bilinear' or 'crop', got {mode!r}")
  x = jax.image.resize(frames.astype(jnp.float32), frames.shape[:-3] + (out_h, out_w, 3), method, antialias=True)
  if mode == 'crop':
    top, left = (out_h - size) // 2, (out_w - size) // 2
    x = x[..., top:top + size, left:left + size, :]
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int) -> None:
  """uint8 (T, H, W, 3) -> an H.264 (yuv420p) mp4, for tests and the synthetic dataset."""
  import av

  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f'{path}: expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}')
  with av.open(os.fspath(path), mode='w') as container:
    stream = container.add_stream('libx264', rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = 'yuv420p'
    stream.options = {'crf': '10', 'preset': 'ultrafast'}
    for rgb in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
