#!/usr/bin/env bash
# Multi-process LQF training with Accelerate. Every product with the data is summed across processes, so the
# solver reaches the same certified optimum as one process (tests/test_train.py; benchmarks/optimum.py).
# GPUs: set num_processes in the config to the number of GPUs and add `--mixed-precision bf16` if you like.
set -euo pipefail
accelerate launch --config_file "$(dirname "$0")/accelerate_config.yaml" -m lqf_hub train \
  --dataset mnist-5k --shots 20 --eval-per-class 20 --image-size 96 \
  --output-dir lqf-output-2proc "$@"
