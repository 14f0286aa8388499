#!/usr/bin/env bash
# One GPU command for issue 13: the recall experiment (grm and none, STEPS=3000 each, equal steps) and
# the chat model's training run as three concurrent processes on one card, then the recall evaluation
# (grm also served as ssc and as none) and the chat evaluation; all in under ~560 s. From the repo root
# on the lent machine, with `.chat_data` carried (scripts/build_chat_data.py; nothing else):
#
#   bash scripts/gpu_train_all.sh
#   DEVICE=cpu SIZE=recall-small SEQ=128 SEG=16 KEYS=64 PREFIX=8 BATCH=8 STEPS=40 MAX_PAIRS=12 START_PAIRS=4 \
#     EVAL_PAIRS=2,4,8 PER_COUNT=2 CHAT_SIZE=tiny CHAT_BATCH=4 CHAT_SEQ=128 TRAIN_SECONDS=40 \
#     EVAL_ARGS="--arith 4 --max-windows 1 --max-tokens 8" OUT=/tmp/dry bash scripts/gpu_train_all.sh  # CPU dry run
#
# Time line (TRAIN_SECONDS=380): ~15 s start-up; the chat training starts once both recall runs have
# logged their graph capture (at most GRAPH_WAIT_SECONDS=120 later; skipped on CPU); the three trainings
# (each captures its whole step in a CUDA graph after a checked warm-up, scripts/mctrain/train_step.py);
# the recall trainings stop at 3,000 steps or TRAIN_SECONDS, then their evaluation runs while the chat model still trains (at most
# RECALL_EVAL_SECONDS); the chat training plans its steps for TRAIN_SECONDS (cut at +20 s); then the
# chat evaluation (at most CHAT_EVAL_SECONDS, shortened by EVAL_ARGS) and packing: 15 + 400 + 120 + 10.
#
# The chat training: the shipped default's size (15.6M parameters), batch 128 x 1,024 = 131k tokens a
# step, lr 2e-3 with 100 warm-up steps (the settings of the first H200 run, docs/MODEL.md), for the
# whole TRAIN_SECONDS: its step count is planned from a timed probe after the graph is in place, and
# (--replan) lengthened while under half is done when the recall runs end and its steps speed up. The
# shipped default saw 58M tokens (444 steps); at the eager 1.35 s/step of a shared card 380 s would
# give 280 steps (37M tokens), so this needs the graph's speed-up: >= 2x makes >= 74M tokens, and the
# recall runs end first and leave the card to it. A larger batch would not help a launch-bound step
# and would halve the optimizer steps; lr stays at the value the run was tuned with.
#
# Writes to $OUT 8 files, each < 16 MiB: recall.tar (recall_{grm,none}_{console.log,log.jsonl},
# recall_eval.{json,md}, recall.png, {grm,none}/model), chat_model.tar.0{0,1,2} (`cat chat_model.tar.0* |
# tar -x -C DIR` gives DIR/model), chat_log.jsonl, chat_console.log, chat_results.tar (chat_summary.json,
# chat_eval.{json,md}) and train_all.log (this script's timings, and steps/s and tokens/s per process).
#
# A recall run that MAX_SECONDS cut before 3,000 steps leaves recall/<agg>/state.pt in recall.tar (~5 MB:
# weights, AdamW state, step, RNG). To finish it in a later command: put it at runs/recall/<agg>/state.pt,
# carry that path, and run `RESUME=1 bash scripts/run_recall.sh` (the same knobs): the batches, schedule
# and curriculum go on as in an uncut run. (The chat run's state, ~190 MB, is too big to come back.)
set -euo pipefail
OUT=${OUT:-$PWD/out}
RUNS=${RUNS:-runs/all}
TRAIN_SECONDS=${TRAIN_SECONDS:-380}
MAX_SECONDS=${MAX_SECONDS:-$TRAIN_SECONDS}
RECALL_EVAL_SECONDS=${RECALL_EVAL_SECONDS:-150}
CHAT_EVAL_SECONDS=${CHAT_EVAL_SECONDS:-120}
EVAL_ARGS=${EVAL_ARGS:---max-windows 8 --arith 100 --max-tokens 48}
# the chat job's knobs are CHAT_*: SIZE, BATCH, SEQ and LR here are the recall experiment's
CHAT_SIZE=${CHAT_SIZE:-default} CHAT_BATCH=${CHAT_BATCH:-128} CHAT_SEQ=${CHAT_SEQ:-1024} CHAT_LR=${CHAT_LR:-2e-3}
CHAT_REPLAN=${CHAT_REPLAN-1}  # lengthen the chat run once the recall runs free the card (empty: off)
. scripts/gpu_lib.sh
chat_defaults
recall_defaults
map_package
STAGE=$RUNS/stage  # what goes into the tars
mkdir -p "$OUT" "$RUNS" "$STAGE/recall" "$STAGE/chat"
LOG=$OUT/train_all.log
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>/dev/null | tee -a "$LOG" || true

recall_job() {
    local pids=()
    for agg in grm none; do
        recall_train "$agg" "$STAGE/recall/recall_${agg}_console.log" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || say "recall training $p FAILED"; done
    say "recall trainings done"
    for agg in grm none; do cp "$RUNS/$agg/log.jsonl" "$STAGE/recall/recall_${agg}_log.jsonl" || true; done
    recall_eval "$STAGE/recall" "$RECALL_EVAL_SECONDS" > "$STAGE/recall/recall_eval_console.log" 2>&1 \
        || say "recall evaluation FAILED or timed out (see recall_eval_console.log)"
    say "recall evaluation done"
}

say "start: recall grm + recall none + chat, TRAIN_SECONDS=$TRAIN_SECONDS"
wait_for_recall_graphs() {  # the recall runs capture their CUDA graphs before the chat job starts: in the first
    # H200 run the chat job already held 127.7 GiB when grm captured, and grm's capture ran out of memory
    local deadline=$(( $(date +%s) + ${GRAPH_WAIT_SECONDS:-120} )) n agg
    while [ "$(date +%s)" -lt "$deadline" ]; do
        n=0
        for agg in grm none; do grep -qs '"event": "graph"' "$RUNS/$agg/log.jsonl" && n=$((n + 1)); done
        [ "$n" = 2 ] && { say "recall graphs captured (or refused): starting the chat training"; return 0; }
        sleep 2
    done
    say "no graph event from the recall runs within ${GRAPH_WAIT_SECONDS:-120} s: starting the chat training"
}

recall_job &
RECALL_PID=$!
[ "$DEVICE" = cpu ] || wait_for_recall_graphs
chat_train "$OUT/chat_console.log" > /dev/null || say "chat training FAILED"
say "chat training done"
chat_pack || say "chat packing FAILED"
cp "$RUNS/chat/summary.json" "$STAGE/chat/chat_summary.json" || true
chat_eval "$STAGE/chat" "$CHAT_EVAL_SECONDS" >> "$OUT/chat_console.log" 2>&1
grep -q "FAILED" "$OUT/chat_console.log" && say "chat evaluation FAILED or timed out (see chat_console.log)"
say "chat evaluation done"
wait "$RECALL_PID" || true

for agg in grm none; do  # the models, and the state of a run MAX_SECONDS cut (to resume: see the header)
    [ -d "$RUNS/$agg/model" ] && mkdir -p "$STAGE/recall/$agg" && cp -r "$RUNS/$agg/model" "$STAGE/recall/$agg/"
    [ -f "$RUNS/$agg/state.pt" ] && cp "$RUNS/$agg/state.pt" "$STAGE/recall/$agg/" && say "recall $agg was cut: state.pt packed"
done
tar -C "$STAGE" -cf "$OUT/recall.tar" recall
tar -C "$STAGE" -cf "$OUT/chat_results.tar" chat
throughput "$RUNS"/{grm,none,chat}/log.jsonl | tee -a "$LOG"
[ -f "$STAGE/recall/recall_eval.md" ] && tee -a "$LOG" < "$STAGE/recall/recall_eval.md"
say "done"
ls -la "$OUT" | tee -a "$LOG"
