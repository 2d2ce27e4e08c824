#!/usr/bin/env bash
# One command for the first machine with a GPU and TensorFlow: measures what the CPU
# machines could not, and writes BENCHMARKS-ready rows naming the machine.
#
#   bash scripts/gpu_check.sh [--out=gpu_check] [--smoke]
#
# In order: the devices TensorFlow sees; the train step (ResNet-50, 224 px, batch 256, mixed
# float16, XLA off and on, N = 1,281,167, M = 4096, each TopM search: exact, sampled, top_k);
# the kNN graph build at N = 1,281,167 with --knn_method=matmul; the input pipeline of
# configs/r50.flags on 2,000 generated ImageNet-like JPEGs (alternated with a plain tf.data
# reference, per CPU-second); the memory plan (--dry_run) and 50 steps of real training from
# an image folder (12,800 generated JPEGs, one epoch, batch 256, mixed precision).
# Rows go to OUT/rows.md (paste them into BENCHMARKS.md's table); logs to OUT/*.log.
#
# --smoke runs every step with tiny sizes on whatever is there (a CPU in CI), so the
# script cannot rot: tests/gpu_check_test.py runs it. PYTHON picks the interpreter
# (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=gpu_check
SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    --out=*) OUT="${arg#--out=}" ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --out=DIR, --smoke)" >&2; exit 2 ;;
  esac
done
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROWS="$OUT/rows.md"
: > "$ROWS"
: > "$OUT/train_step.log"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

if (( SMOKE )); then
  NOTE="gpu_check.sh --smoke"
  STEP=(--encoder=resnet18_cifar --width_multiplier=0.0625 --head=mlp --image_size=8
        --batch_size=8 --bank_sizes=3000 --num_background=32 --steps=1)
  # Every search without XLA, the exact one (TensorFlow ops) under it: XLA compiles dominate.
  STEP_RUNS=("exact,sampled,top_k off" "exact on")
  GRAPH=(--num_rows=3000 --clusters=20 --recall_sample=100)
  IMAGES=24
  PIPELINE=(--image_size=32 --batch_size=8 --rounds=1 --warmup_batches=1 --batches=1)
  TRAIN=(--encoder=resnet18_cifar --width_multiplier=0.0625 --head=mlp --image_size=16
         --batch_size=8 --embedding_dim=16 --num_background=8 --knn_method=brute_force
         --knn_k=5)
else
  NOTE="gpu_check.sh"
  STEP=(--encoder=resnet50 --width_multiplier=1.0 --head=linear --image_size=224
        --batch_size=256 --bank_sizes=1281167 --num_background=4096 --steps=10)
  STEP_RUNS=("exact,sampled,top_k off,on")
  GRAPH=(--num_rows=1281167)
  IMAGES=12800  # 50 steps of 256
  PIPELINE=(--batch_size=256 --rounds=5 --warmup_batches=2 --batches=4)
  TRAIN=(--batch_size=256 --knn_method=matmul)
fi

step() { echo; echo "== $1 (at ${SECONDS} s)"; }

step "devices, and an image folder of $IMAGES generated ImageNet-like JPEGs"
"$PYTHON" - "$OUT/images" "$IMAGES" <<'EOF' | tee "$OUT/devices.log"
import os, sys
import tensorflow as tf
from benchmarks import input_pipeline, report
from invp_tf import data
print("machine:", report.machine())
print("TensorFlow", tf.__version__, "built with CUDA:", tf.test.is_built_with_cuda())
for device in tf.config.list_physical_devices():
    print(" ", device.device_type, device.name)
folder, count = sys.argv[1], int(sys.argv[2])
if not (os.path.isdir(folder) and len(data.list_images(folder)) >= count):
    input_pipeline.write_jpeg_folder(folder, count)
print(len(data.list_images(folder)), "images in", folder)
EOF

step "train step: each TopM search, mixed precision, XLA off and on"
for run in "${STEP_RUNS[@]}"; do
  read -r searches jit <<< "$run"
  "$PYTHON" -m benchmarks.train_step "${STEP[@]}" --background_search="$searches" \
    --jit="$jit" --mixed_precision --output="$ROWS" --machine_note="$NOTE" \
    >> "$OUT/train_step.log" 2>&1 \
    || { tail -5 "$OUT/train_step.log"; echo "train step failed: $OUT/train_step.log" >&2; exit 1; }
done
grep -E "^ *(jit|on|off) " "$OUT/train_step.log" || true

step "kNN graph build, --knn_method=matmul"
"$PYTHON" -m benchmarks.graph_build "${GRAPH[@]}" --method=matmul --output="$ROWS" \
  --machine_note="$NOTE" > "$OUT/graph_build.log" 2>&1 \
  || { tail -5 "$OUT/graph_build.log"; echo "graph build failed: $OUT/graph_build.log" >&2; exit 1; }
tail -3 "$OUT/graph_build.log"

step "input pipeline of configs/r50.flags"
"$PYTHON" -m benchmarks.input_pipeline --flagfile=configs/r50.flags \
  --dataset="folder:$OUT/images" --train_examples="$(( IMAGES < 2000 ? IMAGES : 2000 ))" \
  "${PIPELINE[@]}" --output="$ROWS" --machine_note="$NOTE" > "$OUT/input_pipeline.log" 2>&1 \
  || { tail -5 "$OUT/input_pipeline.log"; echo "input pipeline failed" >&2; exit 1; }
tail -3 "$OUT/input_pipeline.log"

TRAIN_FLAGS=(--flagfile=configs/r50.flags --dataset="folder:$OUT/images" --workdir="$OUT/train"
             --epochs=1 --rampup_epochs=0 --mixed_precision "${TRAIN[@]}")
step "memory plan (invp-train --dry_run)"
"$PYTHON" -m invp_tf.train "${TRAIN_FLAGS[@]}" --dry_run 2> "$OUT/dry_run.log" | tee "$OUT/plan.txt"

step "training: one epoch from the folder"
rm -rf "$OUT/train"
"$PYTHON" -m invp_tf.train "${TRAIN_FLAGS[@]}" > "$OUT/train.log" 2>&1 \
  || { tail -5 "$OUT/train.log"; echo "training failed: $OUT/train.log" >&2; exit 1; }
"$PYTHON" - "$OUT" "$NOTE" "${TRAIN_FLAGS[*]}" <<'EOF'
import json, sys
from benchmarks import report
out, note, flags = sys.argv[1:]
with open(f"{out}/train/metrics.jsonl") as f:
    row = json.loads(f.readlines()[-1])
text = (
    f"training from an image folder | `python -m invp_tf.train {flags}` | {report.machine()}, "
    f"{note} | one epoch: {row['images_per_second']:.1f} img/s over {row['train_seconds']:.1f} s "
    f"of fit, loss {row['loss']:.4f}, kNN graph {row['graph_seconds'] or 0:.1f} s"
)
print(text)
report.append_rows(f"{out}/rows.md", [text])
EOF

step "rows for BENCHMARKS.md ($ROWS); done"
cat "$ROWS"
