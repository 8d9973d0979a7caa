#!/usr/bin/env bash
# FSDP2 smoke run of the co-evolution stage (DIGA with a snapshot teacher, fresh fakes, EMA) under
# `--trainer.strategy=fsdp2`: trains STEPS steps with a distributed checkpoint every STEPS/2, then resumes a second
# run from the middle checkpoint and prints how far its losses are from the first run's (exactly 0 on CPU fp32;
# on GPUs bf16 and NCCL's reduction order make it small but not 0), plus the wall time of each run.
# Sized for a short device session; test it on CPU first:
#   ACCEL=cpu DEVICES=2 STEPS=4 bash bench/fsdp_smoke.sh
#   ACCEL=gpu DEVICES=1 STEPS=40 WIDTH=1024 LAYERS=8 bash bench/fsdp_smoke.sh     # one GPU (a 1-rank mesh)
set -euo pipefail
cd "$(dirname "$0")/.."
ACCEL=${ACCEL:-gpu}; DEVICES=${DEVICES:-1}; STEPS=${STEPS:-40}; WIDTH=${WIDTH:-64}; LAYERS=${LAYERS:-2}
OUT=${OUT:-/tmp/unigendet-fsdp}; PY=${PY:-python3}
PRECISION=${PRECISION:-$([ "$ACCEL" = gpu ] && echo bf16 || echo fp32)}
mkdir -p "$OUT"
[ -d "$OUT/corpus" ] || $PY -m unigendet demo-data --out "$OUT/corpus" --small > /dev/null
HALF=$((STEPS / 2))
OVR="{'mot': {'dim': $WIDTH, 'n_layers': $LAYERS, 'n_heads': 4, 'n_kv_heads': 2, 'mlp_dim': $((WIDTH * 2))},
      'vit': {'dim': 32, 'n_layers': 1, 'n_heads': 2, 'mlp_dim': 64}, 'head': {'diga_layer': 1}}"
fit() {  # fit ROOT [extra args]
  local root=$1; shift
  mkdir -p "$root"
  cat > "$root/trainer.yaml" <<YAML
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: $root/ckpt, every_n_train_steps: $HALF, save_top_k: -1, monitor: null}
    - class_path: callbacks.StepLog
      init_args: {path: $root/steps.jsonl}
YAML
  local t0=$SECONDS
  $PY -m unigendet fit --config experiments/base.yaml --config experiments/gduf.yaml \
    --config experiments/coevolve.yaml --config "$root/trainer.yaml" \
    --model.model_name=demo "--model.model_overrides=$OVR" --model.init_from=null --model.ema_decay=0.9 \
    --model.stage.diga_layer=1 --model.stage.teacher_refresh=3 --model.stage.fresh_fakes_every=5 \
    --model.stage.fresh_fake_px=32 --model.stage.fresh_fake_steps=2 --model.fsdp.param_dtype=$PRECISION \
    --trainer.strategy=fsdp2 --trainer.accelerator=$ACCEL --trainer.devices=$DEVICES --trainer.max_steps=$STEPS \
    --trainer.logger=false --trainer.limit_val_batches=0 --trainer.enable_progress_bar=false \
    --trainer.default_root_dir="$root" --data.train="$OUT/corpus/detection/train.json" \
    --data.val="$OUT/corpus/detection/val.json" --data.tokenizer="$OUT/corpus/tokenizer.json" \
    --data.image_root=null --data.num_workers=1 --data.token_budget=900 \
    --data.gen.train="$OUT/corpus/t2i/train.jsonl" --data.gen.token_budget=400 --data.gen.image_column=image \
    --data.gen.caption_column=caption "$@" > "$root/fit.log" 2>&1 || { tail -40 "$root/fit.log"; exit 1; }
  echo "$root: $((SECONDS - t0)) s"
}
rm -rf "$OUT/a" "$OUT/b"
fit "$OUT/a"
mid=$(ls -d "$OUT"/a/ckpt/*step=$HALF.ckpt)
fit "$OUT/b" --ckpt_path="$mid"
PYTHONPATH=. $PY - "$OUT" "$HALF" <<'PY'
import json, sys
from callbacks import read_step_log
out, half = sys.argv[1], int(sys.argv[2])
a, b = read_step_log(f"{out}/a/steps.jsonl"), read_step_log(f"{out}/b/steps.jsonl")
rel = max(abs(b[s][k] - v) / max(abs(v), 1e-12) for s in b for k, v in a[s].items() if k in b[s])
print(json.dumps({"steps": sorted(a)[-1], "resumed_from": half, "resumed_steps": sorted(b),
                  "max_rel_diff_after_resume": rel, "last_losses": a[max(a)]}))
PY
