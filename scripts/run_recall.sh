#!/usr/bin/env bash
# The recall experiment of issue 13 (scripts/recall_experiment.py, docs/MODEL.md): train a `grm` and a
# `none` model side by side (same seed, batches, schedule and steps), then evaluate both through the
# serving path (the grm model also served as ssc and as none) and plot. From the repo root:
#
#   bash scripts/run_recall.sh        # GPU (carry nothing): the full experiment, T=1024, segment 32
#   DEVICE=cpu SIZE=recall-small SEQ=128 SEG=16 KEYS=256 PREFIX=8 BATCH=32 STEPS=800 MAX_PAIRS=24 \
#       START_PAIRS=4 EVAL_PAIRS=2,4,8,12,16,24 bash scripts/run_recall.sh      # the CPU check
#
# The two trainings run as two processes at once; scripts/gpu_train_all.sh runs them together with the
# chat training. A training that MAX_SECONDS cuts writes RUNS/<agg>/state.pt; `RESUME=1` (same knobs,
# that file in place) continues both from their states, as if never cut. Writes to $OUT at most 8 files: recall_{grm,none}_console.log,
# recall_{grm,none}_log.jsonl, recall_eval.json, recall_eval.md, recall.png and recall_models.tar (both
# checkpoints, fp32). Knobs: scripts/gpu_lib.sh (recall_defaults).
set -euo pipefail
OUT=${OUT:-$PWD/out}
RUNS=${RUNS:-runs/recall}
. scripts/gpu_lib.sh
recall_defaults
map_package
mkdir -p "$OUT" "$RUNS"

pids=()
for agg in grm none; do
    recall_train "$agg" "$OUT/recall_${agg}_console.log" &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for agg in grm none; do cp "$RUNS/$agg/log.jsonl" "$OUT/recall_${agg}_log.jsonl"; done
tar -C "$RUNS" -cf "$OUT/recall_models.tar" grm/model none/model
throughput "$RUNS"/{grm,none}/log.jsonl
recall_eval "$OUT"
ls -la "$OUT"
