#!/usr/bin/env bash
# The performance benchmarks of BENCHMARKS.md on one GPU, inside ~8 minutes on one H200 (one JSON line per
# configuration into $OUT/*.jsonl, profiler tables into $OUT/profile/). Without CUDA it runs everything at test size
# on the CPU, which is how it is checked before a GPU session: `bash bench/gpu_bench.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/unigendet-bench}
mkdir -p "$OUT"
PY=${PY:-python3}
if ! $PY -c "import unigendet" 2>/dev/null; then $PY -m pip install -q -e '.[dev]' || exit 1; fi
export PYTHONUNBUFFERED=1 PYTHONPATH=.
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
  # (b): 4 layers at BAGEL-7B width + the 26-layer ViT, the 16,120-token batch, bf16; with and without AC
  timeout 300 $PY bench/train_step.py --device cuda --preset bagel-7b-mot --layers 4 --layout bagel \
      --modes fwd_bwd coevolution --ac both --warmup 2 --iters 5 --peak-tflops 796 --profile "$OUT/profile" \
      2>&1 | tee "$OUT/train-step-gpu.jsonl"
  timeout 150 $PY bench/inference.py --device cuda --dtype bfloat16 --preset bagel-7b-mot --layers 4 \
      --sizes 256 512 --steps 50 --batch 4 --new-tokens 64 2>&1 | tee "$OUT/inference-gpu.jsonl"
else
  $PY bench/train_step.py --preset tiny --modes fwd_bwd coevolution --ac both --warmup 0 --iters 1 \
      --profile "$OUT/profile" 2>&1 | tee "$OUT/train-step-cpu.jsonl"
  $PY bench/inference.py --preset tiny --sizes 64 --steps 3 --batch 2 --new-tokens 4 2>&1 \
      | tee "$OUT/inference-cpu.jsonl"
fi
