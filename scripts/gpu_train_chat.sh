#!/usr/bin/env bash
# GPU job of issue 13: train the chat default model (ssc, learned router, slow decay init) for a fixed
# wall-clock budget, then evaluate it. Runs on the lent GPU machine from the repo root with
# `.chat_data` carried (scripts/build_chat_data.py: tokenizer + uint16 text and chat arrays). No
# wheels are needed: fla's chunk backward refuses Triton 3.6 on Hopper, so the torch core runs.
#
#   bash scripts/gpu_train_chat.sh                      # ~5.5 min training + ~1.5 min evaluation
#   SIZE=tiny BATCH=4 SEQ=128 TRAIN_SECONDS=20 EVAL_ARGS="--arith 8 --max-windows 2" OUT=/tmp/dry \
#       bash scripts/gpu_train_chat.sh                                     # CPU dry run
#
# Writes to $OUT 8 files of < 16 MiB: the checkpoint as a tar in 3 parts (chat_model.tar.0{0,1,2};
# `cat chat_model.tar.0* | tar -x -C DIR` gives DIR/model), chat_console.log, chat_log.jsonl,
# chat_summary.json, chat_eval.json and chat_eval.md. The model is packed before the evaluation
# runs, so an evaluation failure cannot lose it. Knobs (env): TRAIN_SECONDS, BATCH, SEQ, SEG, TOPK,
# SIZE, CHAT_FRAC, RECALL_FRAC, LR, DATA, EXTRA_TRAIN_ARGS, EVAL_ARGS.
set -euo pipefail
OUT=${OUT:-$PWD/out}
TRAIN_SECONDS=${TRAIN_SECONDS:-330}
BATCH=${BATCH:-128}
SEQ=${SEQ:-1024}
SEG=${SEG:-64}
TOPK=${TOPK:-2}
SIZE=${SIZE:-default}
CHAT_FRAC=${CHAT_FRAC:-0.5}
RECALL_FRAC=${RECALL_FRAC:-0.1}
LR=${LR:-2e-3}
DATA=${DATA:-.chat_data}
mkdir -p "$OUT" runs
[ -f "$DATA/chat_meta.json" ] || { echo "no $DATA/chat_meta.json: carry $DATA (scripts/build_chat_data.py)"; exit 2; }
if ! python3 -c "import mcserve.server" 2>/dev/null; then  # the device image: map the repo to the package
    mkdir -p /tmp/mcpkg/mcserve
    for d in server kernels clients; do ln -sfn "$PWD/$d" "/tmp/mcpkg/mcserve/$d"; done
    export PYTHONPATH=/tmp/mcpkg:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

python3 scripts/train.py --data-dir "$DATA" --size "$SIZE" --aggregation ssc --segment-size "$SEG" --top-k "$TOPK" \
    --seq-len "$SEQ" --batch-size "$BATCH" --lr "$LR" --warmup 100 --decay-init slow --backend torch \
    --chat-frac "$CHAT_FRAC" --recall-frac "$RECALL_FRAC" --recall-max-pairs 32 --evals 4 --log-every 25 --seed 0 \
    --time-budget "$TRAIN_SECONDS" --max-seconds $((TRAIN_SECONDS + 25)) --out runs/chat ${EXTRA_TRAIN_ARGS:-} \
    2>&1 | tee "$OUT/chat_console.log"

tar -C runs/chat -cf runs/chat_model.tar model
split -n 3 -d runs/chat_model.tar "$OUT/chat_model.tar."
cp runs/chat/log.jsonl "$OUT/chat_log.jsonl"
cp runs/chat/summary.json "$OUT/chat_summary.json"

python3 scripts/eval_chat.py --model runs/chat/model --data-dir "$DATA" --seq-len "$SEQ" ${EVAL_ARGS:-} \
    --out "$OUT/chat_eval.json" --md "$OUT/chat_eval.md" 2>&1 | tee -a "$OUT/chat_console.log" \
    || echo "evaluation FAILED (the model is packed)" | tee -a "$OUT/chat_console.log"
ls -la "$OUT"
