"""Resident memory of a fit whose capacity falls on a schedule, on a CPU in bf16: why it grows and what
bounds it.

Every step of a capacity schedule routes another number of tokens, so every step's matmuls have new
shapes. In bf16 on a CPU they run through oneDNN, which keeps a kernel per shape (its primitive cache,
1024 by default), and glibc's malloc keeps what the earlier sizes freed. The fits here convert the SFT
bench's Llama folder to MoD while fine-tuning (``configs/sft.yaml --model.route_every 2``), the capacity
falling from 1 to 0.125 over ``--schedule`` steps, and record each step's resident memory, peak and time:

* ``dense``: the same fit without routing (a reference);
* ``mod``: MoD, the environment as it is;
* ``mod-bounded``: MoD with ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=8 MALLOC_MMAP_THRESHOLD_=131072`` (a small
  kernel cache; big blocks mapped and unmapped rather than kept);
* ``mod-kernels8``, ``mod-mmap``: each of the two alone;
* ``mod-fp32``: MoD in fp32 (no oneDNN bf16 kernels).

Needs the SFT bench's folder and data (``bench/sft.py corpus prepare``). Runs interleaved, ``--reps``
rounds; step time is the median over the schedule's steps past the first ten.

    python bench/schedule_memory.py --runs runs/sft --json bench/results/schedule_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from convert import commit, cpu, load, write  # noqa: E402

BOUNDED = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8", "MALLOC_MMAP_THRESHOLD_": "131072"}
VARIANTS = {
    "dense": ([], {}),
    "mod": (["--model.route_every", "2"], {}),
    "mod-bounded": (["--model.route_every", "2"], BOUNDED),
    "mod-kernels8": (["--model.route_every", "2"], {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8"}),
    "mod-mmap": (["--model.route_every", "2"], {"MALLOC_MMAP_THRESHOLD_": "131072"}),
    "mod-fp32": (["--model.route_every", "2", "--trainer.precision", "32-true"], {}),
}
RECORD = "SCHEDULE_MEMORY_RECORD"


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class StepRecord(pl.Callback):
    """One JSON line per optimizer step into ``$SCHEDULE_MEMORY_RECORD``: resident and peak MiB, seconds."""

    def on_train_batch_start(self, trainer, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        line = {"step": trainer.global_step, "rss": resident_mib(), "peak": peak}
        with open(os.environ[RECORD], "a") as out:
            out.write(json.dumps({**line, "seconds": time.perf_counter() - self.start}) + "\n")


def fit(args, name: str, rep: int) -> dict:
    extra, knobs = VARIANTS[name]
    root = args.work / f"{name}-{rep}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    record = root / "steps.jsonl"
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "fit",
        "--config",
        "configs/sft.yaml",
        *extra,
        "--model.init_from",
        str(args.runs / "dense-llama-chat"),
        "--data.source",
        str(args.runs / "train.jsonl"),
        "--data.seq_len",
        "256",
        "--data.batch_size",
        "16",
        "--trainer.max_steps",
        str(args.schedule + 10),
        "--model.capacity_steps",
        str(args.schedule),
        "--trainer.limit_val_batches",
        "0",
        "--checkpoint.every_n_train_steps",
        str(args.schedule + 10),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.callbacks+=schedule_memory.StepRecord",
    ]
    env = {
        **os.environ,
        **knobs,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO / 'bench'}",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        RECORD: str(record),
    }
    print(f"{name} #{rep} (load {load()})", flush=True)
    with open(root / "fit.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    steps = [json.loads(line) for line in record.read_text().splitlines()]
    return {
        "peak_mib_by_step": {s["step"]: round(s["peak"]) for s in steps if s["step"] % 10 == 0},
        "peak_mib": round(max(s["peak"] for s in steps)),
        "step_s": statistics.median(s["seconds"] for s in steps if 10 < s["step"] <= args.schedule),
    }


def report(data: dict) -> None:
    print(f"commit {data['commit']}, {data['cpu']}; capacity 1 -> 0.125 over {data['schedule']} steps")
    print("| fit | peak MiB, by step | peak MiB | step s (median) |")
    print("|---|---|---|---|")
    for name, runs in data["fits"].items():
        by_step = " / ".join(str(v) for v in runs[0]["peak_mib_by_step"].values())
        peaks = ", ".join(str(r["peak_mib"]) for r in runs)
        steps = statistics.median(r["step_s"] for r in runs)
        print(f"| {name} | {by_step} | {peaks} | {steps:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "sft", help="bench/sft.py's folder")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "schedule_memory")
    parser.add_argument("--schedule", type=int, default=50, help="steps of the capacity schedule")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--report", type=Path, help="print a result file's table and stop")
    args = parser.parse_args()
    if args.report:
        return report(json.loads(args.report.read_text()))
    data = {"commit": commit(), "cpu": cpu(), "schedule": args.schedule, "fits": {name: [] for name in VARIANTS}}
    for rep in range(args.reps):
        for name in VARIANTS:
            data["fits"][name].append(fit(args, name, rep))
    if args.json:
        write(args.json, data)
    report(data)


if __name__ == "__main__":
    main()
