#!/usr/bin/env bash
# The chat model's training as one run over two device commands on the same warm machine (issue 13).
# A device command may run 600 s, and the chat run needs more; the ~190 MB resumable state cannot come
# back through $OUT, but it survives on the machine between two commands issued within its idle
# release. From the repo root, carrying .chat_data and .whl:
#
#   PART=1 bash scripts/gpu_chat_parts.sh    # check fla's core, pick the faster core, train part 1
#   PART=2 bash scripts/gpu_chat_parts.sh    # the next command: resume and finish the planned run
#   PART=1 DEVICE_CHECK=0 CHAT_SIZE=tiny CHAT_BATCH=4 CHAT_SEQ=128 PART1_SECONDS=20 TOTAL_SECONDS=40 \
#     OUT=/tmp/p bash scripts/gpu_chat_parts.sh                        # CPU dry run (then PART=2)
#
# Part 1 first runs tests/gpu/fla_backward_check.py's `chat` and `train` rows (fla's chunk kernel with
# our chunk_bwd_dqkwg, and with fla's own guard lifted, against the torch core at the chat model's
# shapes; training-step throughput of each at CHAT_BATCH) and picks the fastest core whose check
# passed (fla only if it is >= 10% faster than the torch core). It then plans the run's steps for
# TOTAL_SECONDS of training (default: what part 1 has left + PART2_SECONDS) and stops at the end of
# part 1's time, saving the state under $RUNS. Part 2 resumes it (same knobs: the data order,
# schedule and batches go on as in an uncut run) for at most PART2_SECONDS + 35 (its start-up and graph
# capture are not in the plan).
# Each part packs the model it has (the cut one is a usable checkpoint mid-schedule) into $OUT:
# chat_model.tar.0{0,1,2}, chat_log.jsonl, chat_console.log, chat_summary.json, plus fb.json and
# backend.txt in part 1. The chat evaluation (scripts/eval_chat.py) runs afterwards, off the card.
set -euo pipefail
OUT=${OUT:-$PWD/out}
RUNS=${RUNS:-runs}
PART=${PART:?PART=1 or PART=2}
CALL_SECONDS=${CALL_SECONDS:-560}  # this command's wall-clock share; the device allows 600
PART2_SECONDS=${PART2_SECONDS:-480}  # planned for part 2; it may run 35 s over (start-up, graph capture)
DEVICE_CHECK=${DEVICE_CHECK:-1}
CHAT_BATCH=${CHAT_BATCH:-32} CHAT_FRAC=${CHAT_FRAC:-0.6}
T0=$(date +%s)
. scripts/gpu_lib.sh
chat_defaults
map_package
mkdir -p "$OUT" "$RUNS"
STATE=$RUNS/chat_state.pt
elapsed() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

if [ "$PART" = 1 ]; then
    rm -rf "$RUNS/chat" "$STATE"
    BACKEND_ARGS=(--backend torch)
    if [ "$DEVICE_CHECK" = 1 ]; then
        timeout 260 python3 tests/gpu/fla_backward_check.py --rows chat,train --batch "$CHAT_BATCH" \
            --seq-len "$CHAT_SEQ" --budget-s 220 --out "$OUT/fb.json" 2>&1 | tee "$OUT/fb.log" || true
        read -r -a BACKEND_ARGS < <(python3 scripts/mctrain/pick_core.py "$OUT/fb.json")
    fi
    echo "${BACKEND_ARGS[*]}" | tee "$OUT/backend.txt"
    PART1=$(( CALL_SECONDS - $(elapsed) - 45 ))  # 45 s: the closing evaluation, save and pack
    TOTAL=${TOTAL_SECONDS:-$(( PART1 + PART2_SECONDS ))}
    PART1=${PART1_SECONDS:-$PART1}
    echo "part 1: ${PART1}s of a ${TOTAL}s run ($(elapsed)s in)"
    ARGS=(--time-budget "$TOTAL" --max-seconds "$PART1" --save-state "$STATE")
    printf '%s\n' "${BACKEND_ARGS[@]}" > "$RUNS/chat_backend_args"
else
    [ -f "$STATE" ] || { echo "no $STATE: part 1 did not run on this machine (or finished its plan)"; exit 2; }
    mapfile -t BACKEND_ARGS < "$RUNS/chat_backend_args"
    TOTAL=$(python3 -c "import torch,sys; print(torch.load(sys.argv[1], map_location='cpu', weights_only=False)['args']['time_budget'])" "$STATE")
    ARGS=(--time-budget "$TOTAL" --max-seconds "$(( PART2_SECONDS + 35 ))" --save-state "$STATE" --resume "$STATE")
fi

chat_train "$OUT/chat_console.log" "${BACKEND_ARGS[@]}" "${ARGS[@]}"
chat_pack
cp "$RUNS/chat/summary.json" "$OUT/chat_summary.json"
throughput "$RUNS/chat/log.jsonl" | tee -a "$OUT/chat_console.log"
echo "part $PART done at $(elapsed)s; state left to resume: $([ -f "$STATE" ] && echo yes || echo no)" \
    | tee -a "$OUT/chat_console.log"
ls -la "$OUT"
