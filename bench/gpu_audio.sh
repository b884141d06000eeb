#!/usr/bin/env bash
# One prepared accelerator session for the audio codec: the codec benchmark in float32 and bfloat16,
# then mel / VAE / vocoder parity on the GPU (float32 and float64 against the PyTorch goldens).
# Usage (device machine): bash bench/gpu_audio.sh OUTDIR
set -uo pipefail
OUT=${1:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The package and configs from this checkout, without installing them on the device machine.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 100 python3 bench/audio.py --repeats=3 --out="$OUT/audio_gpu_f32.json" 2>&1 | grep -v "^[IW]1" | tail -4
timeout 70 python3 bench/audio.py --dtype=bfloat16 --batch=4 --repeats=3 --out="$OUT/audio_gpu_bf16.json" 2>&1 | grep -v "^[IW]1" | tail -4
JAX_PLATFORMS=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_audio.py \
  -k "matches or end_to_end" 2>&1 | tail -4 | tee "$OUT/gpu_audio_parity.txt"
