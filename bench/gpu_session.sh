#!/usr/bin/env bash
# Every GPU measurement in bench/README.md, as one script for a short lease on one GPU: it runs as it
# is on a fresh machine with the repository and its requirements installed (pip install -e .), and
# stops in one line, writing nothing, where something it needs is missing.
#
#     bash bench/gpu_session.sh                       # figures in bench/results/gpu/, or in $OUT if set
#     BUDGET=300 bash bench/gpu_session.sh            # fewer seconds in all (default 470)
#
# Hard time limits, all with `timeout -k` (SIGTERM, which the pre-emption callback defers to a step
# boundary, then SIGKILL GRACE = 10 s later): each part takes at most its own limit or the budget
# left, whichever is less, and starts only if the budget left holds what it is expected to need (else
# it is recorded as skipped); the whole script, bookkeeping included, is killed at BUDGET + 60 s.
# Parts, most wanted first:
#
#   train_eager, train_compiled, train_cudagraphs   configs/gpu.yaml (d 512 x 8 blocks, seq 1024, batch
#       32, bf16) for 30 steps, eager / compiled / compiled with CUDA graphs (--model.compile_mode
#       reduce-overhead): tokens/s, MFU (flops/mfu against the GPU's bf16 dense peak, and
#       Lightning's train/device/mfu where it knows the GPU), losses; each validates once (top-k and
#       causal) and saves once (calibrating the decision thresholds), so the CUDA-graph run covers
#       validation and calibration of a CUDA-graph model; CUDA-graph skips counted from its log
#   decode           bench/decode.py: the compiled decode step (compile_decode_step, mode
#       reduce-overhead), MoD against dense at batch 1 and 16, eager rows beside it
#   gqa_prefill      bench/gqa_prefill.py: a GQA prompt and decoding, folded query groups against
#       enable_gqa under the cache's mask, and the SDPA kernels each ran
#   step_time        bench/step_time.py: the MoD step against its FLOPs ratio (the quotient) at
#       d_model 256 / 512 / 1024, bf16, eager
#   moe_decode       bench/moe_decode.py: the static MoE decoding step, every expert in place against
#       gathered weights
#   step_time_compiled   the quotient compiled, at d_model 512
#
# $OUT gets two files: session.log (every part's output) and figures.json (the commit, the machine,
# and each part's status, seconds and figures), rewritten after every part, so a session cut short
# keeps what it measured. The commit is git's (with "+dirty" for uncommitted changes), or $COMMIT
# where there is no git checkout.
set -u
SCRIPT=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SCRIPT")/.." || exit 2
BUDGET=${BUDGET:-470}
GRACE=10
T0=$(date +%s)
say() { echo "gpu_session: $*"; }
die() { echo "gpu_session: $*" >&2; exit 2; }

# --- what the session needs, checked before anything is written -----------------------------------
[ -f train.py ] && [ -f configs/gpu.yaml ] && [ -d src/modlm ] ||
    die "not a modlm checkout: $PWD has no train.py, configs/gpu.yaml or src/modlm"
command -v python3 > /dev/null || die "python3 is not on PATH"
timeout -k 1 5 true 2> /dev/null || die "timeout with -k (GNU coreutils) is needed for the hard time limits"
case $BUDGET in '' | *[!0-9]*) die "BUDGET must be a number of seconds, not '$BUDGET'" ;; esac
if [ -z "${MODLM_GPU_SESSION_LIMIT:-}" ]; then  # the whole session under one hard limit too
    export MODLM_GPU_SESSION_LIMIT=$((BUDGET + 60))
    exec timeout -k "$GRACE" "$MODLM_GPU_SESSION_LIMIT" bash "$SCRIPT" "$@"
fi
if git rev-parse --git-dir > /dev/null 2>&1; then
    COMMIT=$(git rev-parse --short=12 HEAD)
    [ -z "$(git status --porcelain --untracked-files=no 2> /dev/null)" ] || COMMIT="$COMMIT+dirty"
elif [ -z "${COMMIT:-}" ]; then
    die "cannot tell which commit is measured: run from a git checkout or set COMMIT"
fi
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/modlm_gpu.XXXXXX") || die "cannot make a temporary folder"
trap 'rm -rf "$WORK"' EXIT
PEAK=$(timeout -k 5 120 python3 -W ignore bench/gpu_figures.py check "$WORK/machine.json" 2> "$WORK/check.err") ||
    die "$(tail -n 1 "$WORK/check.err" | sed 's/^gpu_session: //')"
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT" 2> /dev/null && : > "$OUT/session.log" 2> /dev/null || die "cannot write to OUT=$OUT"
LOG=$OUT/session.log
FIGURES=$OUT/figures.json
python3 bench/gpu_figures.py init "$FIGURES" "$WORK/machine.json" "$COMMIT" "$BUDGET" || die "cannot write $FIGURES"
{ echo "commit $COMMIT"; cat "$WORK/machine.json"; timeout -k 5 20 nvidia-smi 2>&1 || true; } >> "$LOG"
say "commit $COMMIT on $(python3 -c "import json; print(json.load(open('$WORK/machine.json'))['gpu'])"), $BUDGET s budget, figures in $FIGURES"

# --- parts ------------------------------------------------------------------------------------------
elapsed() { echo $(($(date +%s) - T0)); }
STATUS=skipped
part() {  # name, seconds it is expected to need, seconds it may take at most, command...
    local name=$1 need=$2 most=$3; shift 3
    local left=$((BUDGET - $(elapsed))) start rc limit
    limit=$((most < left ? most : left))
    if ((left < need)); then
        STATUS=skipped
        say "$name: skipped ($left s of the budget left, it needs about $need)"
        timeout -k 5 30 python3 bench/gpu_figures.py merge "$FIGURES" "$name" "skipped" 0 0
        return
    fi
    say "$name: at most $limit s (at $(elapsed) s)"
    start=$(date +%s)
    timeout -k "$GRACE" "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    case $rc in 0) STATUS=ok ;; 124 | 137) STATUS="timed out" ;; *) STATUS="failed (exit $rc)" ;; esac
    SECONDS_TAKEN=$(($(date +%s) - start))
    { echo "===== $name: $STATUS, $SECONDS_TAKEN s of $limit"; cat "$WORK/$name.log"; } >> "$LOG"
    say "$name: $STATUS after $SECONDS_TAKEN s"
    if [ "$STATUS" != ok ]; then tail -n 3 "$WORK/$name.log" | sed "s/^/    /"; fi
    LIMIT=$limit
}
record() {  # name, the part's JSON (figures it wrote, if any)
    timeout -k 5 30 python3 bench/gpu_figures.py merge "$FIGURES" "$1" "$STATUS" "$SECONDS_TAKEN" "$LIMIT" "$2" ||
        say "$1: its figures could not be recorded"
}

COMMON=(--config configs/gpu.yaml --trainer.max_steps 30 --trainer.val_check_interval 30
        --trainer.limit_val_batches 2 --trainer.log_every_n_steps 5 --throughput.window_size 2
        --checkpoint.every_n_train_steps 30
        --data.vocab_size 8192 --data.tokenizer_train_chars 4000000 --data.val_windows 64
        --trainer.enable_progress_bar false)
[ "$PEAK" = none ] || COMMON+=(--flops.peak_flops "$PEAK")
train() {  # name, need, most, extra flags
    local name=$1 need=$2 most=$3; shift 3
    part "$name" "$need" "$most" env TORCH_LOGS=perf_hints python3 train.py fit "${COMMON[@]}" \
        --trainer.default_root_dir "$WORK/$name" "$@"
    [ "$STATUS" = skipped ] && return
    timeout -k 5 30 python3 bench/gpu_figures.py train "$WORK/$name" "$WORK/$name.log" "$WORK/$name.json" >> "$LOG" 2>&1
    record "$name" "$WORK/$name.json"
}

# The first run also trains the 8192-token tokenizer (cached for the others and for decode.py's prompts).
train train_eager 45 100 --model.compile false
train train_compiled 70 130 --model.compile true
train train_cudagraphs 80 130 --model.compile true --model.compile_mode reduce-overhead

part decode 90 140 env TORCH_LOGS=perf_hints python3 bench/decode.py --device cuda --batches 1 16 --compile \
    --compile-mode reduce-overhead --no-litgpt --new-tokens 64 --reps 3 --json "$WORK/decode.json"
[ "$STATUS" = skipped ] || record decode "$WORK/decode.json"

part gqa_prefill 20 50 python3 bench/gqa_prefill.py --device cuda --json "$WORK/gqa_prefill.json"
[ "$STATUS" = skipped ] || record gqa_prefill "$WORK/gqa_prefill.json"

part step_time 40 80 python3 bench/step_time.py --device cuda --d-model 256 512 1024 --seq-len 1024 --precision bf16 \
    --head-dim 64 --tokens-per-step 32768 --reps 5 --out "$WORK/step_time.json"
[ "$STATUS" = skipped ] || record step_time "$WORK/step_time.json"

part moe_decode 15 40 python3 bench/moe_decode.py --device cuda --precision bf16 --experts 4 8 16 --top-k 1 2 \
    --batches 1 16 --reps 5 --json "$WORK/moe_decode.json"
[ "$STATUS" = skipped ] || record moe_decode "$WORK/moe_decode.json"

part step_time_compiled 70 110 python3 bench/step_time.py --device cuda --d-model 512 --seq-len 1024 --precision bf16 \
    --head-dim 64 --tokens-per-step 32768 --reps 5 --compile --out "$WORK/step_time_compiled.json"
[ "$STATUS" = skipped ] || record step_time_compiled "$WORK/step_time_compiled.json"

say "done at $(elapsed) s; $FIGURES"
python3 - "$FIGURES" << 'PY'
import json, sys
data = json.load(open(sys.argv[1]))
for name, part in data["parts"].items():
    print(f"  {name}: {part['status']}, {part['seconds']} s")
PY
