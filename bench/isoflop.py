"""The paper's isoFLOP comparison at small scale: dense vs MoD variants at equal training FLOPs.

    python bench/isoflop.py                                   # default grid (2 budgets x 5 variants)
    python bench/isoflop.py --budgets 2e13 4e13 8e13          # add a budget (finished runs are kept)
    python bench/isoflop.py --variants dense mod --budgets 2e13
    python bench/isoflop.py --report                          # table + plot from the finished runs

For each (variant, budget) pair this trains the default run's model (``configs/default.yaml``: d_model
256, 6 blocks, seq_len 256, batch 16, the stdlib corpus) with ``train.py fit`` for as many steps as
the budget buys at that variant's analytic training FLOPs per step (``modlm.flops.training_flops``,
what the ``flops/total`` TensorBoard tag reports), so every run of one budget spends the same
FLOPs; warm-up is 10% of the steps and the cosine schedule spans the whole run. Then ``eval.py``
measures the final validation loss in both routing modes (top-k, and causal as at inference).

Variants (all MoD ones route every other block unless said otherwise):

    dense        the dense twin (no routing)
    mod          capacity 0.125 (the paper's best setting)
    mod_c50      capacity 0.5
    mod_random   capacity 0.125 with random instead of learned routing (the paper's control)
    mod_every    capacity 0.125, routing every block (the paper found this worse)
    mod_wide     capacity 0.125 at d_model 320 (more parameters per FLOP: the paper's point that the
                 FLOP-optimal MoD model is larger than the dense one)

Runs are resumable: each lives in ``<root>/<variant>_<budget>/``; a finished run (``result.json``
written) is skipped, an interrupted one resumes from its ``last.ckpt`` (killing this script
anywhere and starting it again loses at most 100 steps per run). Two times are reported: the
wall-clock of the ``train.py fit`` process (startup, validation and checkpoints included, summed
over resumed segments), and steps x the median step time that ThroughputMonitor logged, which a
stretch of other work on a shared machine does not distort; the plot uses the second.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from modlm import ModelConfig
from modlm.flops import training_flops

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = dict(d_model=256, n_layers=6, n_heads=8, capacity=0.125, route_every=2)
SEQ_LEN, BATCH, VOCAB = 256, 16, 8192
VARIANTS = {
    "dense": dict(route_every=0),
    "mod": {},
    "mod_c50": dict(capacity=0.5),
    "mod_random": dict(random_routing=True),
    "mod_every": dict(route_every=1),
    "mod_wide": dict(d_model=320, n_heads=10),
}
DEFAULT_VARIANTS = ["dense", "mod", "mod_c50", "mod_random", "mod_every"]


def model_fields(variant: str) -> dict:
    return {**DEFAULT_MODEL, **VARIANTS[variant]}


def flops_per_step(fields: dict, vocab_size: int = VOCAB) -> int:
    cfg = ModelConfig(vocab_size=vocab_size, max_seq_len=SEQ_LEN, **fields)
    return BATCH * training_flops(cfg, SEQ_LEN)


def run_dir(root: Path, variant: str, budget: float) -> Path:
    return root / f"{variant}_{budget:.0e}".replace("+", "")


def train_command(variant: str, steps: int, directory: Path, extra: list[str]) -> list[str]:
    cmd = [sys.executable, str(REPO / "train.py"), "fit",
           f"--trainer.default_root_dir={directory}", f"--trainer.max_steps={steps}",
           f"--trainer.val_check_interval={steps}",  # one validation, at the end (in TensorBoard)
           "--trainer.enable_progress_bar=false",
           f"--model.warmup_steps={max(1, round(0.1 * steps))}",
           f"--data.seq_len={SEQ_LEN}", f"--data.batch_size={BATCH}", f"--data.vocab_size={VOCAB}",
           "--data.val_windows=256"]
    cmd += [f"--model.{name}={value}" for name, value in model_fields(variant).items()]
    return cmd + extra


def run_one(root: Path, variant: str, budget: float, extra: list[str], eval_device: str) -> dict:
    directory = run_dir(root, variant, budget)
    result_file = directory / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    steps = max(1, round(budget / flops_per_step(model_fields(variant))))
    last = directory / "checkpoints" / "last.ckpt"
    timing_file = directory / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {"train_s": 0.0, "segments": 0}
    cmd = train_command(variant, steps, directory, extra)
    if last.exists():
        cmd.append(f"--ckpt_path={last}")
    print(f"[{variant} @ {budget:.0e}] {steps} steps" + (" (resuming)" if last.exists() else ""), flush=True)
    start = time.perf_counter()
    with open(directory / "train.log", "a") as log:
        status = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    timing["train_s"] += time.perf_counter() - start
    timing["segments"] += 1
    timing_file.write_text(json.dumps(timing))
    if status != 0:
        raise SystemExit(f"train.py failed with status {status}; see {directory / 'train.log'}")

    eval_json = directory / "eval.json"
    status = subprocess.run([sys.executable, str(REPO / "eval.py"), str(last), "--json", str(eval_json), "--quiet",
                             "--decode-tokens", "16", "--device", eval_device], cwd=REPO,
                            stdout=subprocess.DEVNULL).returncode
    if status != 0:
        raise SystemExit(f"eval.py failed with status {status} on {last}")
    ev = json.loads(eval_json.read_text())
    hparams = torch.load(last, map_location="cpu", weights_only=True)["hyper_parameters"]
    per_step = flops_per_step(model_fields(variant), hparams["vocab_size"])  # the tokenizer's real vocab
    result = {
        "variant": variant, "budget": budget, "steps": steps, "train_flops": steps * per_step,
        "flops_per_step": per_step, "params": ev["params"], "train_s": timing["train_s"],
        "resumed_segments": timing["segments"] - 1,
        "topk_loss": ev["topk.loss"], "causal_loss": ev["causal.loss"],
        "topk_bpb": ev["topk.bpb"], "causal_bpb": ev["causal.bpb"],
        "causal_capacity_used": ev.get("causal.capacity_used"),
    }
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[{variant} @ {budget:.0e}] top-k {result['topk_loss']:.4f}  causal {result['causal_loss']:.4f}  "
          f"{result['train_s'] / 60:.1f} min", flush=True)
    return result


def median_step_s(directory: Path) -> float:
    """Median seconds per optimizer step, from ThroughputMonitor's ``train/device/batches_per_sec``
    (logged every ``log_every_n_steps``): robust to a stretch of a run slowed by other work on a
    shared machine, unlike the run's total wall-clock."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rates = []
    for events in directory.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/device/batches_per_sec" in acc.Tags()["scalars"]:
            rates += [e.value for e in acc.Scalars("train/device/batches_per_sec")]
    return 1.0 / statistics.median(rates) if rates else float("nan")


def collect(root: Path) -> list[dict]:
    results = []
    for path in root.glob("*/result.json"):
        r = json.loads(path.read_text())
        r["median_step_s"] = median_step_s(path.parent)
        r["steps_x_median_s"] = r["steps"] * r["median_step_s"]
        results.append(r)
    return sorted(results, key=lambda r: (r["budget"], list(VARIANTS).index(r["variant"])))


def table(results: list[dict]) -> str:
    lines = ["| budget (FLOPs) | variant | params | steps | val loss top-k | val loss causal | vs dense (causal) "
             "| train.py min | steps x median step, min |",
             "|---|---|---|---|---|---|---|---|---|"]
    dense = {r["budget"]: r["causal_loss"] for r in results if r["variant"] == "dense"}
    for r in results:
        delta = r["causal_loss"] - dense[r["budget"]] if r["budget"] in dense else float("nan")
        lines.append(f"| {r['train_flops']:.3g} | {r['variant']} | {r['params'] / 1e6:.2f}M | {r['steps']} | "
                     f"{r['topk_loss']:.4f} | {r['causal_loss']:.4f} | {delta:+.4f} | {r['train_s'] / 60:.1f} | "
                     f"{r['steps_x_median_s'] / 60:.1f} |")
    return "\n".join(lines)


def plot(results: list[dict], out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    budgets = sorted({r["budget"] for r in results})
    for variant in VARIANTS:
        rows = sorted((r for r in results if r["variant"] == variant), key=lambda r: r["budget"])
        if not rows:
            continue
        # x: the nominal budget (each run's exact FLOPs differ from it by under one step's worth)
        for ax, xs in zip(axes, ([r["budget"] for r in rows], [r["steps_x_median_s"] / 60 for r in rows])):
            line, = ax.plot(xs, [r["topk_loss"] for r in rows], "o-", label=f"{variant} (top-k)")
            if variant != "dense":
                ax.plot(xs, [r["causal_loss"] for r in rows], "x--", color=line.get_color(), label=f"{variant} (causal)")
    axes[0].set_xscale("log")
    axes[0].set_xticks(budgets, [f"{b:.0e}" for b in budgets])
    axes[0].minorticks_off()
    axes[0].set_xlabel("training FLOPs (budget)")
    axes[1].set_xscale("log")
    axes[1].xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[1].set_xlabel("training time: steps x median step time (min, log scale)")
    axes[0].set_ylabel("final validation loss (nats/token)")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[2e13, 4e13], help="training FLOPs per run")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    p.add_argument("--root", type=Path, default=REPO / "runs" / "isoflop", help="one folder per run")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "isoflop",
                   help="writes OUT.json, OUT.md and OUT.png")
    p.add_argument("--title", default="isoFLOP: final validation loss at equal training FLOPs")
    p.add_argument("--eval-device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--report", action="store_true", help="only gather finished runs into the table and plot")
    p.add_argument("extra", nargs="*", help="after --: more train.py arguments for every run (e.g. -- --trainer.precision=32)")
    args = p.parse_args()

    if not args.report:
        for budget in sorted(args.budgets):
            for variant in args.variants:
                run_one(args.root, variant, budget, args.extra, args.eval_device)
    results = collect(args.root)
    if not results:
        raise SystemExit(f"no finished runs under {args.root}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "root": str(args.root)}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": results}, indent=2) + "\n")
    text = table(results)
    args.out.with_suffix(".md").write_text(text + "\n")
    plot(results, args.out.with_suffix(".png"), args.title)
    print(text)
    print(f"-> {args.out.with_suffix('.json')}, .md, .png")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
