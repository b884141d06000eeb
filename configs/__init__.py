"""Experiment configs: each `configs/<name>.py` is one experiment (big_vision); `common.py` holds
the pieces they share and the command-line flag parsing."""

import importlib


def get_config(name: str, arg: str | None = None):
  """`configs/<name>.py`'s config with flags `arg`, for tools and benches that take a config name."""
  return importlib.import_module(f'configs.{name}').get_config(arg)
