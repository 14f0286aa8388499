# Shared by scripts/run_recall.sh, gpu_train_chat.sh, gpu_train_all.sh and gpu_train_both.sh (sourced, from
# the repo root): the package mapping of the device image, and each job's train / pack / eval steps.
# Every knob is an environment variable with the default shown; the callers set OUT and RUNS.

map_package() {  # the device image has no installed mcserve: map the repo's folders to the package
    if ! python3 -c "import mcserve.server" 2>/dev/null; then
        mkdir -p /tmp/mcpkg/mcserve
        for d in server kernels clients; do ln -sfn "$PWD/$d" "/tmp/mcpkg/mcserve/$d"; done
        export PYTHONPATH=/tmp/mcpkg:$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1
}

recall_defaults() {
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
    RECALL_TASK=(--seq-len "$SEQ" --n-keys "$KEYS" --n-values "$KEYS" --max-prefix "$PREFIX")
}

recall_train() {  # $1 = aggregation, $2 = console log; RUNS/$1 gets model/, log.jsonl, summary.json, and
    # state.pt when MAX_SECONDS cuts the run: RESUME=1 continues from it (same knobs, RUNS/$1/state.pt in place)
    local agg=$1 resume=()
    [ "${RESUME:-0}" = 1 ] && resume=(--resume "$RUNS/$agg/state.pt")
    python3 scripts/recall_experiment.py train "${RECALL_TASK[@]}" --size "$SIZE" --aggregation "$agg" \
        --out "$RUNS/$agg" --segment-size "$SEG" --decay-init slow --steps "$STEPS" --batch-size "$BATCH" --lr "$LR" \
        --min-pairs "$MIN_PAIRS" --start-pairs "$START_PAIRS" --max-pairs "$MAX_PAIRS" --max-seconds "$MAX_SECONDS" \
        --device "$DEVICE" --threads "$THREADS" --log-every 50 --eval-every 250 \
        --save-state "$RUNS/$agg/state.pt" "${resume[@]}" ${EXTRA_TRAIN_ARGS:-} > "$2" 2>&1
}

recall_eval() {  # $1 = folder for recall_eval.{json,md} and recall.png; $2 = a time limit in seconds (optional)
    ${2:+timeout "$2"} python3 scripts/recall_experiment.py eval "${RECALL_TASK[@]}" --model "grm=$RUNS/grm/model" \
        --model "none=$RUNS/none/model" --variants ssc,none --pairs "$EVAL_PAIRS" --per-count "$PER_COUNT" \
        --device "$DEVICE" --threads "$THREADS" --out "$1/recall_eval.json" --md "$1/recall_eval.md" \
        --plot "$1/recall.png"
}

chat_defaults() {
    TRAIN_SECONDS=${TRAIN_SECONDS:-330}
    CHAT_BATCH=${CHAT_BATCH:-${BATCH:-128}}
    CHAT_SEQ=${CHAT_SEQ:-${SEQ:-1024}}
    CHAT_SEG=${CHAT_SEG:-64}
    TOPK=${TOPK:-2}
    CHAT_SIZE=${CHAT_SIZE:-${SIZE:-default}}
    CHAT_FRAC=${CHAT_FRAC:-0.5}
    RECALL_FRAC=${RECALL_FRAC:-0.1}
    CHAT_LR=${CHAT_LR:-${LR:-2e-3}}
    CHAT_WARMUP=${CHAT_WARMUP:-100}
    DATA=${DATA:-.chat_data}
    # torch: the torch core (no wheels needed). auto: fla's chunk kernel with mctrain.fla_backward's
    # chunk_bwd_dqkwg where fla refuses its own (#640), if it passes train.py's check, else the torch
    # core (carry .whl: fla + einops); tests/gpu/fla_backward_check.py measures which is faster
    CHAT_BACKEND=${CHAT_BACKEND:-torch}
    [ -f "$DATA/chat_meta.json" ] || { echo "no $DATA/chat_meta.json: carry $DATA (scripts/build_chat_data.py)"; exit 2; }
}

chat_train() {  # $1 = console log; trains RUNS/chat. $2... = train.py's core and budget arguments, by
    # default `--backend CHAT_BACKEND` for TRAIN_SECONDS (steps planned from a probe); gpu_chat_parts.sh
    # passes its own (a run planned over two commands, the state saved and resumed)
    local log=$1 run=("${@:2}")
    [ ${#run[@]} -gt 0 ] || run=(--backend "$CHAT_BACKEND" --time-budget "$TRAIN_SECONDS" ${CHAT_REPLAN:+--replan}
                                 --max-seconds $((TRAIN_SECONDS + 20)))
    python3 scripts/train.py --data-dir "$DATA" --size "$CHAT_SIZE" --aggregation ssc --segment-size "$CHAT_SEG" \
        --top-k "$TOPK" --seq-len "$CHAT_SEQ" --batch-size "$CHAT_BATCH" --lr "$CHAT_LR" --warmup "$CHAT_WARMUP" \
        --decay-init slow --chat-frac "$CHAT_FRAC" --recall-frac "$RECALL_FRAC" \
        --recall-max-pairs 32 --evals 4 --log-every 25 --seed 0 "${run[@]}" --out "$RUNS/chat" \
        ${EXTRA_CHAT_ARGS:-${EXTRA_TRAIN_ARGS:-}} 2>&1 | tee "$log"
}

chat_pack() {  # the checkpoint as a tar in 3 parts under $OUT (cat chat_model.tar.0* | tar -x -C DIR), and the log
    tar -C "$RUNS/chat" -cf "$RUNS/chat_model.tar" model
    split -n 3 -d "$RUNS/chat_model.tar" "$OUT/chat_model.tar."
    cp "$RUNS/chat/log.jsonl" "$OUT/chat_log.jsonl"
}

chat_eval() {  # $1 = folder for chat_eval.{json,md}; $2 = a time limit in seconds (optional); a failure must
    # not lose the packed model
    ${2:+timeout "$2"} python3 scripts/eval_chat.py --model "$RUNS/chat/model" --data-dir "$DATA" --seq-len "$CHAT_SEQ" \
        ${EVAL_ARGS:-} --out "$1/chat_eval.json" --md "$1/chat_eval.md" || echo "chat evaluation FAILED (the model is packed)"
}

throughput() {  # $@ = log.jsonl files: mean steps/s and tokens/s of each run's graph (or eager) steps
    python3 - "$@" <<'PY'
import json, sys
for path in sys.argv[1:]:
    try:
        rows = [json.loads(line) for line in open(path)]
    except OSError as e:
        print(f"{path}: {e}")
        continue
    train = [r for r in rows if r.get("event") == "train"]
    fast = [r for r in train if r.get("mode") == "graph"] or train
    start = next((r for r in rows if r.get("event") == "start"), {})
    step_s = [1 / r["steps_per_s"] if "steps_per_s" in r else r.get("step_s", 0) for r in fast]
    tok = [r["tok_per_s"] for r in fast if "tok_per_s" in r]
    done = train[-1]["step"] if train else 0
    graph = [r for r in rows if r.get("event") in ("graph", "graph_check")]
    print(f"{path}: {start.get('aggregation')} {done} steps; {len(fast)} logs in mode {fast[-1].get('mode') if fast else '-'}: "
          f"{len(step_s) / max(sum(step_s), 1e-9):.2f} steps/s, {sum(tok) / max(len(tok), 1) / 1e3:.0f}k tokens/s; "
          f"graph: {[{k: v for k, v in r.items() if k in ('event', 'ok', 'max_rel_diff', 'reason')} for r in graph]}")
PY
}
