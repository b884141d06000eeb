"""Seam statistics of windowed generation (visaudio_jax/eval/seams.py): a join the signal does not
notice scores like any other boundary; a hard cut between different sounds stands out."""
import numpy as np

from visaudio_jax.eval.seams import seam_scores

T = np.arange(16000 * 4) / 16000
TONE = np.sin(2 * np.pi * 440 * T) * (1 + 0.3 * np.sin(2 * np.pi * 1.3 * T))


def test_a_continuous_signal_has_no_seam():
  scores = seam_scores([(np.stack([TONE, 0.5 * TONE]), [16000, 32000])])
  assert scores['seams'] == 2 and scores['seam_boundaries'] == 5 and scores['other_boundaries'] > 200
  assert scores['flux_ratio'] < 1.0 and scores['flux_z'] < 2 and scores['flux_seam'] < scores['flux_other_p95']
  assert scores['ild_jump_seam'] < 1e-3  # the ILD is constant: 6 dB throughout


def test_a_hard_cut_to_another_sound_and_side_stands_out():
  wave = np.stack([TONE, 0.5 * TONE])
  other = np.sin(2 * np.pi * 700 * T[16000:32000])
  wave[:, 16000:32000] = np.stack([0.5 * other, other])  # another pitch, the other side
  scores = seam_scores([(wave, [16000, 32000]), (np.stack([TONE, 0.5 * TONE]), [8000])])  # pooled over clips
  assert scores['seams'] == 3 and scores['flux_ratio'] > 5 and scores['flux_z'] > 10
  assert 2.0 < scores['ild_jump_seam'] < 13.0  # 6 dB -> -6 dB at one seam, spread over its boundaries
