"""Test setup: 8 simulated CPU devices, configured before JAX initialises its backends."""
import os
import pathlib

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The suite is dominated by XLA compiling many small programs; LLVM's cheaper optimisation level
# roughly halves compile time and changes no arithmetic (no fast-math either way).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
# Tests compile the same tiny programs many times over; a persistent cache dedupes them.
jax.config.update('jax_compilation_cache_dir', str(pathlib.Path(__file__).parents[1] / '.pytest_cache' / 'jax'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


def fixture_path(*parts: str) -> pathlib.Path:
  """A golden fixture; a missing file fails the test loudly instead of skipping it."""
  path = FIXTURES.joinpath(*parts)
  if not path.exists():
    pytest.fail(f'missing test fixture {path} (copy it from ../shared/fixtures)')
  return path
