#!/usr/bin/env bash
# The recall experiment of issue 13 (scripts/recall_experiment.py, docs/MODEL.md): train a `grm` and a
# `none` model side by side (same seed, batches, schedule and steps), then evaluate both through the
# serving path (the grm model also served as ssc and as none) and plot. From the repo root:
#
#   bash scripts/run_recall.sh        # GPU (carry nothing): the full experiment, T=1024, segment 32
#   DEVICE=cpu SIZE=recall-small SEQ=128 SEG=16 KEYS=256 PREFIX=8 BATCH=32 STEPS=800 MAX_PAIRS=24 \
#       START_PAIRS=4 EVAL_PAIRS=2,4,8,12,16,24 bash scripts/run_recall.sh      # the CPU check
#
# The two trainings run as two processes at once (each is bound by kernel launches, not by the GPU).
# Writes to $OUT at most 8 files: recall_{grm,none}_console.log, recall_{grm,none}_log.jsonl,
# recall_eval.json, recall_eval.md, recall.png and recall_models.tar (both checkpoints, fp32).
set -euo pipefail
OUT=${OUT:-$PWD/out}
DEVICE=${DEVICE:-auto}
SIZE=${SIZE:-recall}
SEQ=${SEQ:-1024}
SEG=${SEG:-32}
KEYS=${KEYS:-256}
PREFIX=${PREFIX:-64}
BATCH=${BATCH:-128}
STEPS=${STEPS:-3000}
LR=${LR:-5e-3}
MIN_PAIRS=${MIN_PAIRS:-2}
START_PAIRS=${START_PAIRS:-8}
MAX_PAIRS=${MAX_PAIRS:-160}
EVAL_PAIRS=${EVAL_PAIRS:-4,8,16,32,64,96,128,160}
PER_COUNT=${PER_COUNT:-16}
MAX_SECONDS=${MAX_SECONDS:-420}
THREADS=${THREADS:-1}
RUNS=${RUNS:-runs/recall}
mkdir -p "$OUT" "$RUNS"
if ! python3 -c "import mcserve.server" 2>/dev/null; then  # the device image: map the repo to the package
    mkdir -p /tmp/mcpkg/mcserve
    for d in server kernels clients; do ln -sfn "$PWD/$d" "/tmp/mcpkg/mcserve/$d"; done
    export PYTHONPATH=/tmp/mcpkg:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
TASK=(--seq-len "$SEQ" --n-keys "$KEYS" --n-values "$KEYS" --max-prefix "$PREFIX")

pids=()
for agg in grm none; do
    python3 scripts/recall_experiment.py train "${TASK[@]}" --size "$SIZE" --aggregation "$agg" --out "$RUNS/$agg" \
        --segment-size "$SEG" --decay-init slow --steps "$STEPS" --batch-size "$BATCH" --lr "$LR" \
        --min-pairs "$MIN_PAIRS" --start-pairs "$START_PAIRS" --max-pairs "$MAX_PAIRS" --max-seconds "$MAX_SECONDS" \
        --device "$DEVICE" --threads "$THREADS" --log-every 50 --eval-every 250 ${EXTRA_TRAIN_ARGS:-} \
        > "$OUT/recall_${agg}_console.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for agg in grm none; do cp "$RUNS/$agg/log.jsonl" "$OUT/recall_${agg}_log.jsonl"; done
tar -C "$RUNS" -cf "$OUT/recall_models.tar" grm/model none/model

python3 scripts/recall_experiment.py eval "${TASK[@]}" --model "grm=$RUNS/grm/model" --model "none=$RUNS/none/model" \
    --variants ssc,none --pairs "$EVAL_PAIRS" --per-count "$PER_COUNT" --device "$DEVICE" --threads "$THREADS" \
    --out "$OUT/recall_eval.json" --md "$OUT/recall_eval.md" --plot "$OUT/recall.png"
ls -la "$OUT"
