#!/usr/bin/env bash
# Every GPU measurement in bench/README.md, as one script that fits a short GPU lease (at most about
# 8 minutes on one H200). Results go to $OUT (default bench/results/gpu/); each part has its own
# time limit, so a slow part cannot take the others down with it.
#
#     bash bench/gpu_session.sh                 # on a machine with a CUDA GPU and requirements.txt installed
#
# 1-3: configs/gpu.yaml (d 512 x 8 blocks, seq 1024, batch 32, bf16) for 30 steps, eager, compiled,
#      and compiled with CUDA graphs (--model.compile_mode reduce-overhead): tokens/s and MFU
#      (modlm's FLOPs over the H200's 989 TFLOP/s bf16 dense peak), from the run's own logs;
# 4:   the MoD step against its FLOPs ratio (the quotient; 1.0 = routing costs nothing beyond its
#      FLOPs) at d 256 / 512 / 1024, bf16, compiled, with decode tokens/s at batch 1 and 16
#      (MoD and dense interleaved).
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
stamp() { echo "=== $(($(date +%s) - T0)) s: $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())" || exit 1
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /'

# A tokenizer once for the three runs (the stdlib corpus, 8192 tokens: seconds, not the preset's 50M characters).
COMMON=(--config configs/gpu.yaml --trainer.max_steps 30 --trainer.val_check_interval 30 --trainer.limit_val_batches 2
        --trainer.log_every_n_steps 10 --data.vocab_size 8192 --data.tokenizer_train_chars 4000000
        --checkpoint.every_n_train_steps 1000 --flops.peak_flops 989e12 --trainer.enable_progress_bar false)
run_preset() {  # name, time limit, extra flags
    local name=$1 limit=$2; shift 2
    stamp "configs/gpu.yaml, $name"
    timeout "$limit" python3 train.py fit "${COMMON[@]}" --trainer.default_root_dir "/tmp/gpu_$name" "$@" \
        > "$OUT/train_$name.log" 2>&1
    echo "exit status $?"
    python3 - "$name" <<'PY' | tee "$OUT/train_$name.txt"
import sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
name = sys.argv[1]
for f in Path(f"/tmp/gpu_{name}").rglob("events.out.tfevents.*"):
    ea = EventAccumulator(str(f)); ea.Reload()
    for tag in ("train/device/items_per_sec", "train/device/mfu", "flops/mfu", "train/loss"):
        if tag in ea.Tags()["scalars"]:
            values = [e.value for e in ea.Scalars(tag)]
            print(name, tag, "last", round(values[-1], 5), "max", round(max(values), 5))
PY
}
run_preset eager 80 --model.compile false
run_preset compiled 120 --model.compile true
run_preset cudagraphs 130 --model.compile true --model.compile_mode reduce-overhead

stamp "MoD step vs its FLOPs ratio, compiled bf16; decode batch 1 and 16"
timeout 150 python3 bench/step_time.py --d-model 256 512 1024 --seq-len 1024 --precision bf16 --head-dim 64 \
    --tokens-per-step 32768 --reps 8 --compile --decode --decode-batch 1 16 --new-tokens 64 \
    --out "$OUT/step_time_compiled.json"
stamp "done"
