#!/usr/bin/env bash
# GPU job of issue 13: train the chat default model (ssc, learned router, slow decay init) for a fixed
# wall-clock budget, then evaluate it. Runs on the lent GPU machine from the repo root with
# `.chat_data` carried (scripts/build_chat_data.py: tokenizer + uint16 text and chat arrays). No
# wheels are needed with the default CHAT_BACKEND=torch (the torch core); CHAT_BACKEND=auto (carry
# .whl) trains on fla's chunk kernel, with our chunk_bwd_dqkwg for the one fla refuses on Hopper (#640).
#
#   bash scripts/gpu_train_chat.sh                      # ~5.5 min training + ~1.5 min evaluation
#   SIZE=tiny BATCH=4 SEQ=128 TRAIN_SECONDS=20 EVAL_ARGS="--arith 8 --max-windows 2" OUT=/tmp/dry \
#       bash scripts/gpu_train_chat.sh                                     # CPU dry run
#
# Writes to $OUT 8 files of < 16 MiB: the checkpoint as a tar in 3 parts (chat_model.tar.0{0,1,2};
# `cat chat_model.tar.0* | tar -x -C DIR` gives DIR/model), chat_console.log, chat_log.jsonl,
# chat_summary.json, chat_eval.json and chat_eval.md. The model is packed before the evaluation
# runs, so an evaluation failure cannot lose it. Knobs (env): scripts/gpu_lib.sh (chat_defaults);
# CHAT_EVAL=0 skips the evaluation (it needs llguidance from .whl; run scripts/eval_chat.py elsewhere).
# scripts/gpu_train_all.sh runs this together with the recall experiment.
set -euo pipefail
OUT=${OUT:-$PWD/out}
RUNS=${RUNS:-runs}
. scripts/gpu_lib.sh
chat_defaults
map_package
mkdir -p "$OUT" "$RUNS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

chat_train "$OUT/chat_console.log"
chat_pack
cp "$RUNS/chat/summary.json" "$OUT/chat_summary.json"
throughput "$RUNS/chat/log.jsonl" | tee -a "$OUT/chat_console.log"
[ "${CHAT_EVAL:-1}" = 1 ] && chat_eval "$OUT" 2>&1 | tee -a "$OUT/chat_console.log"
ls -la "$OUT"
