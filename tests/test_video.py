"""Video decoding and frame sampling (MMAudio's `av_utils.read_frames` rule), on synthetic videos
written here with PyAV: each frame shows its own index as an 8-bit block code."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile

from visaudio_jax.encoders.video import VideoError, read_frames, resize_frames, sample_times, write_video

H, W = 64, 96


def counter_frames(n: int) -> np.ndarray:
  frames = np.zeros((n, H, W, 3), np.uint8)
  for i in range(n):
    for bit in range(8):
      if (i >> bit) & 1:
        r, c = divmod(bit, 4)
        frames[i, r * 32:(r + 1) * 32, c * 24:(c + 1) * 24] = 255
  return frames


def read_counter(frame: np.ndarray) -> int:
  value = 0
  for bit in range(8):
    r, c = divmod(bit, 4)
    value |= int(frame[r * 32 + 8:r * 32 + 24, c * 24 + 6:c * 24 + 18].mean() > 127) << bit
  return value


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
  root = tmp_path_factory.mktemp('videos')
  paths = {}
  for fps in (30, 24):
    paths[fps] = root / f'counter_{fps}fps.mp4'
    write_video(paths[fps], counter_frames(3 * fps), fps)  # 3 s
  return paths


@pytest.mark.parametrize('source_fps', [30, 24])
def test_frames_follow_mmaudios_sampling_rule(videos, source_fps):
  """Grid time t_k (t_0 = 0, t_{k+1} = t_k + 1/fps in float) gets the first frame at or after it:
  a 30 fps source is thinned (8 fps takes frames 0, 4, 8, 12, 15, ...), a 24 fps source repeats
  a frame once a second on the 25 fps grid."""
  duration = 2.0
  clip, sync = read_frames(videos[source_fps], [8, 25], duration)
  frame_times = np.arange(3 * source_fps) / source_fps
  for fps, frames in ((8, clip), (25, sync)):
    assert frames.shape == (int(fps * duration), H, W, 3) and frames.dtype == np.uint8
    expected = np.searchsorted(frame_times, sample_times(fps, len(frames)), side='left')
    assert [read_counter(f) for f in frames] == expected.tolist()
  if source_fps == 30:
    assert [read_counter(f) for f in clip[:6]] == [0, 4, 8, 12, 15, 19]
  if source_fps == 24:
    assert [read_counter(f) for f in sync[23:27]] == [23, 24, 25, 25]


def test_short_videos_error_or_pad(videos):
  with pytest.raises(VideoError, match=r'shorter than the requested 5.0 s .*pass pad=True'):
    read_frames(videos[30], [8], 5.0)
  (clip,) = read_frames(videos[30], [8], 5.0, pad=True)
  assert clip.shape[0] == 40 and read_counter(clip[-1]) == read_counter(clip[23]) == 87  # ceil(2.875 * 30)


def test_files_without_usable_video_are_named_in_the_error(videos, tmp_path):
  audio_only = tmp_path / 'audio.wav'
  soundfile.write(audio_only, np.zeros(1600, np.float32), 16000)
  with pytest.raises(VideoError, match='audio.wav: has no video stream'):
    read_frames(audio_only, [8], 1.0)
  text = tmp_path / 'notes.mp4'
  text.write_text('not a video')
  with pytest.raises(VideoError, match='notes.mp4: cannot open as a video'):
    read_frames(text, [8], 1.0)
  with pytest.raises(VideoError, match='no decodable frames after 10.0 s'):
    read_frames(videos[30], [8], 1.0, start_s=10.0)


def test_resize_squash_and_centre_crop():
  frames = np.zeros((2, 40, 80, 3), np.uint8)
  frames[:, :, 20:60] = 200  # the centre square of a 2:1 frame is bright, the sides dark
  crop = np.asarray(resize_frames(frames, 20, 'crop'))
  squash = np.asarray(resize_frames(frames, 20, 'squash'))
  assert crop.shape == squash.shape == (2, 20, 20, 3) and crop.dtype == np.uint8
  assert crop[:, :, 2:-2].min() >= 195  # crop keeps only the centre
  assert squash[:, :, :3].max() <= 10 and squash[:, :, 7:13].min() >= 195  # squash keeps the sides
  flat = np.full((1, 37, 53, 3), 77, np.uint8)
  assert (np.asarray(resize_frames(flat, 24, 'squash_bilinear')) == 77).all()
