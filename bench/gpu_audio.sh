#!/usr/bin/env bash
# One prepared accelerator session for the audio codec: mel / VAE / vocoder parity on the GPU
# (float32 and float64 against the PyTorch goldens), then the codec benchmark in float32 and bfloat16.
# Usage (device machine): bash bench/gpu_audio.sh OUTDIR
set -uo pipefail
OUT=${1:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import jax; print(jax.__version__, jax.devices())' | tee -a "$OUT/gpu.txt"
JAX_PLATFORMS=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_audio.py tests/test_vocoder.py \
  -k "matches or parity or float" 2>&1 | tail -8 | tee "$OUT/gpu_audio_parity.txt"
timeout 200 python3 bench/audio.py --repeats=5 --out="$OUT/audio_gpu_f32.json" 2>&1 | grep -v "^[IW]1" | tail -5
timeout 150 python3 bench/audio.py --dtype=bfloat16 --batch=4 --repeats=5 --out="$OUT/audio_gpu_bf16.json" 2>&1 | grep -v "^[IW]1" | tail -5
