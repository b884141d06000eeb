#!/usr/bin/env bash
# One prepared accelerator session for training speed: the real jitted train step of train.py for
# large_44k on one GPU (goal: bf16 MFU >= 50 % on an H200), then small_16k for scale. Each row has its
# own timeout so a slow compile cannot eat the session; bench/train_step.py records failed rows.
# Usage (device machine): bash bench/gpu_train.sh OUTDIR
set -uo pipefail
OUT=${1:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The package and configs from this checkout, without installing them on the device machine.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 240 python3 bench/train_step.py --configs=large_44k --variants=bf16+remat,bf16 --per_device_batch=8 \
  --steps=5 --json="$OUT/train_step_gpu_large.json" 2>&1 | grep -v "^[IW]1" | tail -5
timeout 150 python3 bench/train_step.py --configs=large_44k --variants=bf16+scan+remat --per_device_batch=8 \
  --steps=5 --json="$OUT/train_step_gpu_large_scan.json" 2>&1 | grep -v "^[IW]1" | tail -4
timeout 120 python3 bench/train_step.py --configs=small_16k --variants=bf16 --per_device_batch=16 \
  --steps=5 --json="$OUT/train_step_gpu_small.json" 2>&1 | grep -v "^[IW]1" | tail -4
