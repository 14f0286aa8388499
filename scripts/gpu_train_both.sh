#!/usr/bin/env bash
# GPU job of issue 5: train an `ssc` and a `none` MC-GDN identically (size, data, batches, steps,
# schedule) and evaluate both. Runs on the lent GPU machine from the repo root, with `.whl`
# (fla-core + einops wheels) and `.train_data` (tokenizer + uint16 token ids, made on a CPU machine
# by scripts/train_tokenizer.py and scripts/train.py --prepare-only) carried along.
#
# One command may run 10 minutes, so the job comes in two stages of < 9 minutes each:
#   bash scripts/gpu_train_both.sh ssc            # train ssc for TRAIN_SECONDS, eval it (+ served as grm, none)
#   STEPS=N bash scripts/gpu_train_both.sh none   # train none for the same N steps, eval it
# N is printed at the end of the ssc stage (and is `steps` in ssc_summary.json); on the same warm
# machine STEPS may be left out. `all` runs both stages in one command (~17 minutes).
#
# Each stage writes to $OUT at most 8 files of < 16 MiB: the checkpoint as a tar in 3 parts
# (<name>_model.tar.0{0,1,2}; reassemble with `cat <name>_model.tar.0* | tar -x -C DIR`), the console
# log, log.jsonl, summary.json, eval JSON and markdown. Knobs (env): TRAIN_SECONDS, BATCH, SEQ, SEG,
# TOPK, EVAL_PER_CELL, RECALL_SECONDS, SIZE (tiny: a CPU dry run of this script), EXTRA_TRAIN_ARGS
# (more train.py flags, e.g. "--recall-frac 0.5 --recall-max-pairs 32").
set -euo pipefail
STAGE=${1:?usage: gpu_train_both.sh ssc|none|all}
OUT=${OUT:-$PWD/out}
TRAIN_SECONDS=${TRAIN_SECONDS:-330}
BATCH=${BATCH:-128}
SEQ=${SEQ:-1024}
SEG=${SEG:-64}
TOPK=${TOPK:-2}
EVAL_PER_CELL=${EVAL_PER_CELL:-8}
RECALL_SECONDS=${RECALL_SECONDS:-35}
SIZE=${SIZE:-default}
mkdir -p "$OUT" runs

[ -f .train_data/meta.json ] || { echo "no .train_data/meta.json: carry .train_data"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
. scripts/gpu_lib.sh
map_package
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

COMMON=(--data-dir .train_data --size "$SIZE" --segment-size "$SEG" --top-k "$TOPK" --seq-len "$SEQ"
        --batch-size "$BATCH" --seed 0 --log-every 100 ${EXTRA_TRAIN_ARGS:-})

pack() {  # $1 = run name: the checkpoint and logs into $OUT before the (slower, optional) evaluation
    local name=$1
    tar -C "runs/$name" -cf "runs/${name}_model.tar" model
    split -n 3 -d "runs/${name}_model.tar" "$OUT/${name}_model.tar."
    cp "runs/$name/log.jsonl" "$OUT/${name}_log.jsonl"
    cp "runs/$name/summary.json" "$OUT/${name}_summary.json"
}

evaluate() {  # $1 = run name; failures here must not lose the packed model
    local name=$1
    python3 scripts/eval.py --data-dir .train_data --model "$name=runs/$name/model" --variants grm,none \
        --per-cell "$EVAL_PER_CELL" --recall-seconds "$RECALL_SECONDS" --seq-len "$SEQ" \
        --sample-text tests/server/data/heldout_sample.txt \
        --out "$OUT/eval_$name.json" --md "$OUT/eval_$name.md" || echo "eval of $name FAILED (model is packed)"
}

stage_ssc() {
    python3 scripts/train.py "${COMMON[@]}" --aggregation ssc --out runs/ssc \
        --time-budget "$TRAIN_SECONDS" --max-seconds $((TRAIN_SECONDS + 25)) 2>&1 | tee "$OUT/ssc_console.log"
    pack ssc
    evaluate ssc 2>&1 | tee -a "$OUT/ssc_console.log"
    echo "NEXT: STEPS=$(python3 -c 'import json; print(json.load(open("runs/ssc/summary.json"))["steps"])') \
bash scripts/gpu_train_both.sh none"
}

stage_none() {
    local steps=${STEPS:-}
    if [ -z "$steps" ] && [ -f runs/ssc/summary.json ]; then
        steps=$(python3 -c 'import json; print(json.load(open("runs/ssc/summary.json"))["steps"])')
    fi
    [ -n "$steps" ] || { echo "set STEPS to the ssc run's step count (ssc_summary.json: steps)"; exit 2; }
    python3 scripts/train.py "${COMMON[@]}" --aggregation none --out runs/none \
        --steps "$steps" --max-seconds $((TRAIN_SECONDS + 25)) 2>&1 | tee "$OUT/none_console.log"
    pack none
    evaluate none 2>&1 | tee -a "$OUT/none_console.log"
}

case "$STAGE" in
    ssc) stage_ssc ;;
    none) stage_none ;;
    all) stage_ssc; stage_none ;;
    *) echo "unknown stage $STAGE (ssc|none|all)"; exit 2 ;;
esac
ls -la "$OUT"
