"""Probing input videos and muxing a soundtrack into a copy (visaudio_jax.sample.media), on small
H.264 clips written by the tests."""
from __future__ import annotations

import pathlib
from fractions import Fraction

import av
import numpy as np
import pytest

from visaudio_jax.audio.wav import write_wav
from visaudio_jax.encoders.video import VideoError, write_video
from visaudio_jax.sample import media

FPS, SECONDS, WIDTH, HEIGHT = 25, 2, 32, 48


@pytest.fixture
def video(tmp_path: pathlib.Path) -> pathlib.Path:
  path = tmp_path / 'in.mp4'
  frames = np.random.default_rng(0).integers(0, 256, (FPS * SECONDS, HEIGHT, WIDTH, 3), dtype=np.uint8)
  write_video(path, frames, FPS)
  return path


def tones(sample_rate: int, seconds: float = SECONDS, left: float = 440.0, right: float = 660.0) -> np.ndarray:
  """Different tones per channel, so a channel swap or a mono mixdown shows."""
  t = np.arange(round(seconds * sample_rate)) / sample_rate
  return 0.5 * np.stack([np.sin(2 * np.pi * left * t), np.sin(2 * np.pi * right * t)])


def video_packets(path: pathlib.Path) -> list[tuple[Fraction, bytes]]:
  """(presentation time in seconds, bytes) of every real video packet, in file order."""
  with av.open(str(path)) as container:
    return [(p.pts * p.time_base, bytes(p)) for p in container.demux(video=0) if p.size]


def decode_audio(path: pathlib.Path) -> tuple[np.ndarray, av.audio.stream.AudioStream]:
  """All of the single audio stream's samples as (channels, samples), and that stream."""
  with av.open(str(path)) as container:
    assert len(container.streams.audio) == 1
    stream = container.streams.audio[0]
    frames = list(container.decode(stream))
    assert frames[0].time == 0  # the audio starts with the video's first frame
    wave = np.concatenate([f.to_ndarray() for f in frames], axis=1)
    if not frames[0].format.is_planar:
      wave = wave.reshape(-1, stream.channels).T  # packed L R L R ... -> (channels, samples)
    return wave, stream


def dominant_hz(channel: np.ndarray, sample_rate: int) -> float:
  return np.argmax(np.abs(np.fft.rfft(channel))) * sample_rate / len(channel)


def test_probe_video(video):
  info = media.probe_video(video)
  assert info.path == str(video)
  assert info.duration_s == pytest.approx(SECONDS, abs=1e-9)  # to the end of the last frame, not its start
  assert (info.fps, info.num_frames, info.width, info.height, info.audio_streams) == (FPS, FPS * SECONDS, WIDTH,
                                                                                        HEIGHT, 0)


def _zero_frame_avi(path: pathlib.Path) -> None:
  # FFmpeg's mp4 muxer drops a track with no samples (the file then has no video stream); AVI keeps it.
  with av.open(str(path), mode='w') as container:
    stream = container.add_stream('libx264', rate=FPS)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, 'yuv420p'
    container.start_encoding()


@pytest.mark.parametrize('name, make, message', [
    ('missing.mp4', lambda path: None, 'no such file'),
    ('text.mp4', lambda path: path.write_text('not a video\n' * 100), 'cannot open'),
    ('audio.wav', lambda path: write_wav(path, tones(16000), 16000), 'no video stream'),
    ('empty.avi', _zero_frame_avi, 'no frames'),
])
def test_probe_video_errors(tmp_path, name, make, message):
  path = tmp_path / name
  make(path)
  with pytest.raises(VideoError, match=message) as info:
    media.probe_video(path)
  assert str(path) in str(info.value)


@pytest.mark.parametrize('sample_rate', [16000, 44100])
def test_mux_aac_round_trip(video, tmp_path, sample_rate):
  out = tmp_path / 'out.mp4'
  wave = tones(sample_rate)
  media.mux(video, wave, sample_rate, out)
  assert video_packets(out) == video_packets(video)  # copied, not re-encoded, and retimed nowhere
  decoded, stream = decode_audio(out)
  assert (stream.codec_context.name, stream.channels, stream.rate) == ('aac', 2, sample_rate)
  assert stream.duration * stream.time_base == Fraction(wave.shape[1], sample_rate)
  # The decoder trims the encoder's priming but not the padding of the last 1024-sample frame.
  assert wave.shape[1] <= decoded.shape[1] <= wave.shape[1] + 2 * 1024
  n = wave.shape[1]
  assert [dominant_hz(c[:n], sample_rate) for c in decoded] == [440.0, 660.0]
  assert np.corrcoef(decoded[0, :n], wave[0])[0, 1] > 0.99
  info = media.probe_video(out)
  assert abs(info.duration_s - media.probe_video(video).duration_s) <= 1024 / sample_rate
  assert (info.num_frames, info.audio_streams) == (FPS * SECONDS, 1)


@pytest.mark.parametrize('codec, suffix', [('flac', '.mkv'), ('flac', '.mp4'), ('pcm_s16le', '.mov'),
                                           ('pcm_s16le', '.mkv')])
def test_mux_lossless(video, tmp_path, codec, suffix):
  out = tmp_path / f'out{suffix}'
  wave = tones(16000) * 2.2 - 0.1  # beyond [-1, 1] at the peaks: clipped, not wrapped
  media.mux(video, wave, 16000, out, audio_codec=codec)
  decoded, stream = decode_audio(out)
  assert (stream.codec_context.name, stream.channels, stream.rate) == (codec, 2, 16000)
  np.testing.assert_array_equal(decoded, np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16))
  assert [t for t, _ in video_packets(out)] == [t for t, _ in video_packets(video)]
  assert [b for _, b in video_packets(out)] == [b for _, b in video_packets(video)]


@pytest.mark.parametrize('codec, name, wave, message', [
    ('flac', 'out.mov', tones(16000), 'audio codec flac goes in .mp4/.mkv, not .mov'),
    ('pcm_s16le', 'out.mp4', tones(16000), 'audio codec pcm_s16le goes in .mov/.mkv, not .mp4'),
    ('aac', 'out.wav', tones(16000), 'not .wav'),
    ('mp3', 'out.mp4', tones(16000), 'audio_codec must be one of'),
    ('aac', 'out.mp4', tones(16000)[:1], r'\(2, samples\), got float64 \(1, 32000\)'),
    ('aac', 'out.mp4', tones(16000)[0], r'\(2, samples\), got float64 \(32000,\)'),
    ('aac', 'out.mp4', (tones(16000) * 32767).astype(np.int16), 'float stereo wave'),
    ('aac', 'out.mp4', np.where(np.arange(32000) == 5, np.nan, tones(16000)), 'non-finite'),
])
def test_mux_rejects_before_writing(video, tmp_path, codec, name, wave, message):
  with pytest.raises(ValueError, match=message):
    media.mux(video, wave, 16000, tmp_path / name, audio_codec=codec)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['in.mp4']


def test_mux_rejects_sample_rate_the_codec_lacks(video, tmp_path):
  with pytest.raises(ValueError, match='sample_rate=17000'):
    media.mux(video, tones(17000), 17000, tmp_path / 'out.mp4')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['in.mp4']


def test_mux_replaces_the_input_audio(tmp_path):
  source = tmp_path / 'with_audio.mp4'
  with av.open(str(source), mode='w') as container:
    video = container.add_stream('libx264', rate=FPS)
    video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, 'yuv420p'
    audio = container.add_stream('aac', rate=16000, layout='mono')
    for rgb in np.zeros((FPS * SECONDS, HEIGHT, WIDTH, 3), np.uint8):
      container.mux(video.encode(av.VideoFrame.from_ndarray(rgb, format='rgb24')))
    frame = av.AudioFrame.from_ndarray(tones(16000, left=1000)[:1].astype(np.float32), format='fltp', layout='mono')
    frame.sample_rate, frame.pts = 16000, 0
    container.mux(audio.encode(frame) + audio.encode(None) + video.encode())
  assert media.probe_video(source).audio_streams == 1
  out = tmp_path / 'out.mkv'
  media.mux(source, tones(44100), 44100, out)
  decoded, stream = decode_audio(out)
  assert (stream.channels, stream.rate) == (2, 44100)
  assert [dominant_hz(c[:2 * 44100], 44100) for c in decoded] == [440.0, 660.0]
  assert [b for _, b in video_packets(out)] == [b for _, b in video_packets(source)]


def test_mux_missing_input_leaves_nothing(tmp_path):
  out = tmp_path / 'out.mp4'
  with pytest.raises(VideoError, match='no such file'):
    media.mux(tmp_path / 'missing.mp4', tones(16000), 16000, out)
  assert list(tmp_path.iterdir()) == []


def test_mux_failing_midway_keeps_the_old_output(video, tmp_path, monkeypatch):
  out = tmp_path / 'out.mp4'
  out.write_bytes(b'old')
  calls, temps_seen = [], []
  real_seconds = media._seconds

  def failing_seconds(packet):
    calls.append(packet)
    if len(calls) == 20:  # after the header and some packets are on disk
      temps_seen.extend(p for p in tmp_path.iterdir() if p.name.startswith('.out.'))
      raise RuntimeError('disk on fire')
    return real_seconds(packet)

  monkeypatch.setattr(media, '_seconds', failing_seconds)
  with pytest.raises(RuntimeError, match='disk on fire'):
    media.mux(video, tones(16000), 16000, out)
  assert len(temps_seen) == 1  # the half-written temp file existed, and is gone now
  assert out.read_bytes() == b'old'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['in.mp4', 'out.mp4']
