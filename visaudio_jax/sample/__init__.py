"""Sampling: features -> binaural latents (the jitted ODE with CFG) -> waveforms through the codec.

`generate.WaveSampler` is what the trainer's evaluators call; `command.run` is `sample.py`.
"""
