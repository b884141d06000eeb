"""Input videos for sampling: probing them, and muxing a generated binaural soundtrack into a copy.

Both only demux the input (PyAV/FFmpeg): probing never decodes a frame, and `mux` copies the first
video stream packet for packet, so the output's picture is bit-identical to the input's and nothing is
lost to a second lossy encode.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
from fractions import Fraction

import numpy as np

from visaudio_jax.encoders.video import VideoError
from visaudio_jax.files import atomic_path

# Audio codec -> the container suffixes it goes in (FFmpeg's mov muxer refuses FLAC in .mov; PCM in
# .mp4 is a recent ISO addition few players read).
AUDIO_CODECS = {
    'aac': ('.mp4', '.mov', '.mkv'),
    'flac': ('.mp4', '.mkv'),
    'pcm_s16le': ('.mov', '.mkv'),
}


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What sampling needs to know about an input video before decoding it (see `probe_video`)."""
  path: str
  duration_s: float
  fps: float
  num_frames: int
  width: int
  height: int
  audio_streams: int


def _open(path: str):
  """`path` opened for demuxing, or a VideoError saying why it cannot be."""
  import av  # PyAV (FFmpeg); imported here so the rest of the package works without it

  if not os.path.exists(path):
    raise VideoError(f'{path}: no such file')
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError) as exc:
    raise VideoError(f'{path}: cannot open as a video ({exc})') from exc
  if not container.streams.video:
    container.close()
    raise VideoError(f'{path}: has no video stream')
  return container


def probe_video(path: str | os.PathLike) -> VideoInfo:
  """Demuxes (never decodes) the first video stream of `path`, so it is fast on long videos.

  duration_s runs from the first frame's start to the last frame's end: max(pts + duration) - min(pts)
  over the packets, in the stream's time base; if a packet lacks a duration, the stream's (or else
  the container's) declared duration is used instead. num_frames counts the packets with a pts.
  """
  import av

  path = os.fspath(path)
  with _open(path) as container:
    stream = container.streams.video[0]
    start = end = None
    num_frames = 0
    durations_known = True
    try:
      for packet in container.demux(stream):
        if packet.pts is None:
          continue
        num_frames += 1
        duration = packet.duration or 0
        durations_known &= duration > 0
        start = packet.pts if start is None else min(start, packet.pts)
        end = packet.pts + duration if end is None else max(end, packet.pts + duration)
    except av.error.FFmpegError as exc:
      raise VideoError(f'{path}: demuxing failed ({exc})') from exc
    if not num_frames:
      raise VideoError(f'{path}: the video stream has no frames')
    if durations_known:
      duration_s = float((end - start) * stream.time_base)
    elif stream.duration:
      duration_s = float(stream.duration * stream.time_base)
    elif container.duration:
      duration_s = container.duration / av.time_base
    else:
      raise VideoError(f'{path}: neither the frames nor the file give a duration')
    rate = stream.average_rate or stream.guessed_rate
    return VideoInfo(path=path, duration_s=duration_s, fps=float(rate) if rate else num_frames / duration_s,
                     num_frames=num_frames, width=stream.codec_context.width,
                     height=stream.codec_context.height, audio_streams=len(container.streams.audio))


def _seconds(packet) -> Fraction | None:
  """When `packet` is decoded (dts, else pts), for interleaving streams; None if it has no timestamp."""
  stamp = packet.dts if packet.dts is not None else packet.pts
  return None if stamp is None else stamp * packet.time_base


def _audio_frame(wave: np.ndarray, sample_rate: int, fmt: str, pts: int):
  """(2, samples) float in [-1, 1] -> one stereo AudioFrame in `fmt` ('fltp', or 's16' quantised to
  round(clip(wave, -1, 1) * 32767))."""
  import av

  wave = np.clip(wave, -1.0, 1.0)
  if fmt == 'fltp':
    array = wave.astype(np.float32)
  else:
    array = np.round(wave * 32767).astype(np.int16).T.reshape(1, -1)  # packed: L R L R ...
  frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(array), format=fmt, layout='stereo')
  frame.sample_rate = sample_rate
  frame.time_base = Fraction(1, sample_rate)
  frame.pts = pts
  return frame


def mux(video_path: str | os.PathLike, wave: np.ndarray, sample_rate: int, out_path: str | os.PathLike,
        audio_codec: str = 'aac', audio_bitrate: int = 192_000) -> None:
  """Writes `out_path`: the first video stream of `video_path` copied (not re-encoded) plus one stereo
  audio stream, `wave` (2, samples) float in [-1, 1] encoded with `audio_codec` at `sample_rate`.

  The input's own audio (and any other stream) is dropped. The audio starts with the video's first
  frame and its stream lasts exactly the wave's length (AAC decoders drop the encoder's priming but may
  return the padding of the last 1024-sample frame). `audio_bitrate` applies to aac; flac and pcm_s16le
  are lossless over the int16 quantisation round(clip(wave, -1, 1) * 32767). The file is written under a
  temporary name and renamed once complete, so a failure never leaves a partial file at `out_path`.
  """
  import av

  video_path, out_path = os.fspath(video_path), os.fspath(out_path)
  if audio_codec not in AUDIO_CODECS:
    raise ValueError(f'audio_codec must be one of {sorted(AUDIO_CODECS)}, got {audio_codec!r}')
  suffix = pathlib.Path(out_path).suffix.lower()
  if suffix not in AUDIO_CODECS[audio_codec]:
    raise ValueError(f'{out_path}: audio codec {audio_codec} goes in {"/".join(AUDIO_CODECS[audio_codec])}, '
                     f'not {suffix or "a file without a suffix"}')
  rates = av.Codec(audio_codec, 'w').audio_rates
  if sample_rate <= 0 or (rates and sample_rate not in rates):
    raise ValueError(f'{out_path}: audio codec {audio_codec} cannot encode at sample_rate={sample_rate}')
  wave = np.asarray(wave)
  if wave.ndim != 2 or wave.shape[0] != 2 or not wave.shape[1] or not np.issubdtype(wave.dtype, np.floating):
    raise ValueError(f'{out_path}: expected a float stereo wave shaped (2, samples), got {wave.dtype} {wave.shape}')
  if not np.isfinite(wave).all():
    raise ValueError(f'{out_path}: the wave has non-finite values')

  with _open(video_path) as source:
    in_stream = source.streams.video[0]
    start = Fraction(in_stream.start_time or 0) * in_stream.time_base
    with atomic_path(out_path) as tmp:
      try:
        with av.open(os.fspath(tmp), mode='w') as output:
          out_video = output.add_stream_from_template(in_stream)
          out_audio = output.add_stream(audio_codec, rate=sample_rate, layout='stereo')
          out_audio.format = 'fltp' if audio_codec == 'aac' else 's16'
          if audio_codec == 'aac':
            out_audio.bit_rate = audio_bitrate
          frame = _audio_frame(wave, sample_rate, out_audio.format.name, round(start * sample_rate))
          audio = collections.deque(out_audio.encode(frame) + out_audio.encode(None))
          for packet in source.demux(in_stream):
            if not packet.size:  # the demuxer's end-of-stream marker, not a frame
              continue
            when = _seconds(packet)
            while audio and when is not None and _seconds(audio[0]) <= when:
              output.mux(audio.popleft())
            packet.stream = out_video
            output.mux(packet)
          output.mux(list(audio))
      except av.error.FFmpegError as exc:
        raise VideoError(f'{video_path} -> {out_path}: muxing failed ({exc})') from exc
