#!/usr/bin/env bash
# Multi-process LQF training with Accelerate. `--batch-size` is the global batch, split across processes,
# so the result matches a single-process run with the same batch (see tests/test_cli.py).
# GPUs: set num_processes in the config to the number of GPUs and add `--mixed-precision bf16` if you like.
set -euo pipefail
accelerate launch --config_file "$(dirname "$0")/accelerate_config.yaml" -m lqf_hub train \
  --dataset mnist-5k --shots 20 --eval-per-class 20 --image-size 96 --epochs 5 --batch-size 32 \
  --output-dir lqf-output-2proc "$@"
