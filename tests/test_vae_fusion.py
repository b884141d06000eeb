"""`fuse_mp_weight` is bitwise MMAudio's `MPConv1D.remove_weight_norm` (torch, float32, x86-64 CPU).

Golden data: tests/fixtures/mp_fusion (its README has the generator). Fan-ins cover every tail
length torch's norm kernel treats differently (fan_in % 8: 0, 1, 2, 3, 4, 6, 7) and fan_in 1; draws
were kept only where a near-miss summation order would get some row wrong.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import safetensors.numpy

from conftest import fixture_path
from visaudio_jax.convert.audio import fuse_mp_weight

SHAPES = [(8, 10, 1), (16, 10, 3), (7, 20, 3), (12, 33, 1), (5, 128, 3), (4, 7, 5), (3, 1, 1), (9, 7, 1)]


@functools.cache
def golden() -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(fixture_path('mp_fusion', 'mp_fusion.safetensors')))


@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_fuse_mp_weight_is_bitwise_torch(shape):
  name = 'w' + 'x'.join(map(str, shape))
  raw, fused = golden()[f'{name}.raw'], golden()[f'{name}.fused']
  assert raw.shape == shape and raw.dtype == np.float32
  np.testing.assert_array_equal(fuse_mp_weight(raw), fused)
