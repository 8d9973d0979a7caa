#!/usr/bin/env bash
# One short GPU session (well inside 10 minutes on one H200): the CUDA-only tests, parity on the GPU with TF32 off
# (SDPA and compiled FlexAttention), the routing benchmark at BAGEL-7B width, and an FSDP2 save/resume smoke run. Writes logs to ${OUT:-/tmp}.
# Test it on CPU first: the pytest part then skips the gpu tests with a reason, the benchmark runs tiny.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/unigendet-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
if ! $PY -c "import unigendet" 2>/dev/null; then $PY -m pip install -q -e '.[dev]' || exit 1; fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
export PYTHONUNBUFFERED=1
$PY -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest-gpu.log"
$PY - <<'PY' 2>&1 | tee "$OUT/parity-gpu.log"
import json, torch
from pathlib import Path
from safetensors.torch import load_file
from tests.conftest import parity_fixture_dirs
from unigendet.checkpoint.loading import load_model
from unigendet.model.packing import from_reference_batch
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
for folder in parity_fixture_dirs():
    model, _ = load_model(folder, device=dev)
    model.eval()
    t = load_file(folder / "batch.safetensors")
    batch = from_reference_batch(t, json.loads((folder / "batch.json").read_text())).to(dev)
    exp = load_file(folder / "expected.safetensors")
    for backend in (["sdpa", "flex"] if dev == "cuda" else ["sdpa"]):
        model.attn_backend = backend
        with torch.no_grad():
            out = model(batch, noise=t["noise"].to(dev), return_hidden=True)
        diffs = {k: (out[o].cpu() - exp[k]).abs().max().item()
                 for k, o in (("ce", "ce"), ("mse", "mse"), ("fake_predicted", "det_logits"),
                              ("last_hidden_state", "last_hidden"))}
        print(json.dumps({"fixture": folder.name, "device": dev, "backend": backend, "max_abs_diff": diffs}))
PY
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  PYTHONPATH=. $PY bench/mot_routing.py --device cuda --dtype bfloat16 --dim 3584 --heads 28 --kv-heads 4 \
      --mlp 18944 --tokens 8192 --iters 10 2>&1 | tee "$OUT/routing-gpu.jsonl"
  PYTHONPATH=. $PY bench/model_step.py --device cuda --presets debug --backends sdpa flex --tokens 8192 --iters 3 \
      2>&1 | tee "$OUT/model-step-gpu.jsonl"
  # FSDP2 on one GPU (NCCL, bf16 gathers, fp32 reductions), save + resume from the middle checkpoint
  OUT="$OUT/fsdp" ACCEL=gpu DEVICES=1 STEPS=40 WIDTH=1024 LAYERS=8 PY=$PY bash bench/fsdp_smoke.sh \
      2>&1 | tee "$OUT/fsdp-smoke.log"
else
  PYTHONPATH=. $PY bench/mot_routing.py --tokens 1024 --iters 2 2>&1 | tee "$OUT/routing-cpu.jsonl"
fi
