"""Sampling: videos (+ captions) -> binaural audio and binaural videos with a trained model.

`pipeline.Pipeline` (from a run directory, an MMAudio checkpoint or fresh weights) is the Python entry
point; `sampler.Sampler` the device side (fixed-shape batches over a mesh, per-clip noise, overlapping
windows for any length, `windows`) that the trainer's evaluators also call; `inputs`, `media` and
`command` are `sample.py`'s videos, probing/muxing and outputs.
"""
