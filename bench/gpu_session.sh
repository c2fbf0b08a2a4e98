#!/usr/bin/env bash
# Every GPU measurement in bench/README.md, as one script that fits a short GPU lease (~10 min on
# one H200). Results go to $OUT (default bench/results/gpu/); each part has its own time limit so a
# slow part cannot take the others down with it.
#
#     bash bench/gpu_session.sh                 # on a machine with a CUDA GPU and requirements.txt installed
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
stamp() { echo "=== $(($(date +%s) - T0)) s: $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, lightning, datasets, jsonargparse, tokenizers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'datasets', datasets.__version__, torch.cuda.get_device_name())" || exit 1

# 1. Training step, MoD vs dense, eager bf16, at shapes big enough to load the GPU (64k tokens/step).
stamp "step time bf16"
timeout 80 python3 bench/step_time.py --d-model 256 512 1024 --seq-len 512 1024 2048 --precision bf16 \
    --head-dim 64 --tokens-per-step 65536 --reps 10 --out "$OUT/step_time_bf16.json"
# 2. The same in fp32 (true fp32: TF32 left off, torch's default) at two shapes.
stamp "step time fp32"
timeout 50 python3 bench/step_time.py --d-model 512 1024 --seq-len 1024 --precision fp32 \
    --head-dim 64 --tokens-per-step 32768 --reps 5 --out "$OUT/step_time_fp32.json"
# 3. The default run's shape (d 256, seq 256, 4096 tokens/step) and decode speed at batch 1.
stamp "default shape + decode"
timeout 50 python3 bench/step_time.py --d-model 256 --seq-len 256 --precision bf16 --tokens-per-step 4096 \
    --reps 20 --decode --out "$OUT/step_time_default.json"
# 4. The isoFLOP grid at one budget: the same commands as on the CPU, trained on this GPU.
stamp "isoflop"
timeout 190 python3 bench/isoflop.py --budgets 8e13 --root /tmp/isoflop --out "$OUT/isoflop_gpu" \
    --title "isoFLOP at 8e13 FLOPs (H200)"
# (if the grid ran out of time, gather the runs that finished)
[ -f "$OUT/isoflop_gpu.json" ] || python3 bench/isoflop.py --report --root /tmp/isoflop --out "$OUT/isoflop_gpu" \
    --title "isoFLOP at 8e13 FLOPs (H200)"
# 5. The GPU preset (bf16, torch.compile, d 512 x 8 blocks, seq 1024) for a few steps, with MFU.
stamp "train.py --config configs/gpu.yaml"
timeout 100 python3 train.py fit --config configs/gpu.yaml --trainer.max_steps 40 --trainer.val_check_interval 40 \
    --trainer.log_every_n_steps 10 --data.vocab_size 8192 --data.tokenizer_train_chars 4000000 \
    --trainer.default_root_dir /tmp/gpu_run --flops.peak_flops 989e12 > "$OUT/train_gpu.log" 2>&1
echo "train.py exit status $?"
python3 - <<'EOF' >> "$OUT/train_gpu.log" 2>&1
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
for f in Path("/tmp/gpu_run").rglob("events.out.tfevents.*"):
    ea = EventAccumulator(str(f)); ea.Reload()
    for tag in sorted(ea.Tags()["scalars"]):  # the last value of every scalar tag
        print(tag, round(ea.Scalars(tag)[-1].value, 5))
EOF
tail -25 "$OUT/train_gpu.log"
# 6. torch.compile'd MoD vs dense at the largest shape.
stamp "step time compiled"
timeout 80 python3 bench/step_time.py --d-model 1024 --seq-len 2048 --precision bf16 --head-dim 64 \
    --tokens-per-step 65536 --reps 10 --compile --out "$OUT/step_time_compiled.json"
stamp "done"
