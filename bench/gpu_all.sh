#!/usr/bin/env bash
# Everything only a GPU shows (for a session lent a GPU): first the 8-minute preflight (self-tests, CUDA tests, short
# benchmarks, a training step; see bench/preflight.py), then the full benchmarks. Copy the printed tables into the
# README's performance table with the device and the date.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python ssd.py --preflight
python -m pytest -q tests/test_generate.py tests/test_sampling.py
python bench/bench_kernel.py
python bench/bench_generate.py --device cuda
python bench/bench_train.py --models qwen3-1.7b
