#!/usr/bin/env bash
# One prepared accelerator session: float32/float64 parity on the GPU, then network benchmarks.
# Usage (device machine): bash bench/gpu_check.sh OUTDIR
set -uo pipefail
OUT=${1:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The package and configs from this checkout, without installing them on the device machine.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import jax; print(jax.__version__, jax.devices())' | tee -a "$OUT/gpu.txt"
JAX_PLATFORMS=cuda timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_mmaudio_parity.py -k "float32 or float64_matches" 2>&1 | tail -5 | tee "$OUT/gpu_parity.txt"
timeout 300 python3 bench/network.py --presets=large_44k --batch=8 --repeats=5 --out="$OUT/network_gpu_f32.json" 2>&1 | grep -v "^[IW]1" | tail -4
timeout 200 python3 bench/network.py --presets=small_16k,large_44k --flags=bf16 --batch=8 --repeats=5 --out="$OUT/network_gpu_bf16.json" 2>&1 | grep -v "^[IW]1" | tail -4
timeout 150 python3 bench/network.py --presets=large_44k --flags=bf16,cudnn --batch=8 --repeats=5 --out="$OUT/network_gpu_bf16_cudnn.json" 2>&1 | grep -v "^[IW]1" | tail -4
