#!/usr/bin/env bash
# The GPU check (ess.gpu_suite): ess bench on a Llama-2-7B-shaped random model in bf16 at batch 1
# and 32, every schedule (and hold-back where the policy has it), the ESS/SFT training-step ratio
# for LoRA and full fine-tuning in mixed precision, and peak memory. Prints a table, writes JSON.
#   benchmarks/gpu.sh [--json FILE]     one GPU
#   benchmarks/gpu.sh --tiny            a CI-sized model on CPU
set -euo pipefail
PYTHON="${PYTHON:-python}"
exec "$PYTHON" -m ess.gpu_suite "$@"
