"""Command-line tools over the package: TPU AOT compilation (`aot`), post-hoc EMA synthesis
(`posthoc_ema`). Run as `python -m visaudio_jax.tools.<name>`."""
import os
from typing import Callable

import jax
from absl import app


def run_on_host_cpu(main: Callable, define_flags: Callable[[], None]) -> None:
  """`app.run(main)` with JAX kept on the host CPU unless JAX_PLATFORMS says otherwise: these tools
  need no accelerator, and one may be busy training."""
  if 'JAX_PLATFORMS' not in os.environ:
    jax.config.update('jax_platforms', 'cpu')
  define_flags()
  app.run(main)
