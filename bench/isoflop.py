"""isoFLOP curves: dense vs Mixture-of-Depths variants, several model sizes per training-FLOP budget.

    python bench/isoflop.py bench/isoflop/cpu.yaml              # run the grid (resumable), then report
    python bench/isoflop.py bench/isoflop/cpu.yaml --report     # table + plots from finished runs only
    python bench/isoflop.py bench/isoflop/cpu.yaml --commit     # git-commit each finished run's result
    python bench/isoflop.py GRID.yaml --only mod --budgets 7e12 # a slice of the grid

The grid file (see ``bench/isoflop/cpu.yaml``) names budgets, model sizes, variants, seeds and the
``train.py`` flags every run shares. For each (budget, size, variant, seed) this trains with
``train.py fit`` for as many steps as the budget buys at that model's analytic training FLOPs per
step (``modlm.flops.training_flops``, what ``flops/total`` reports), so every run of one budget spends
the same FLOPs; warm-up is a fixed fraction of the steps and the cosine schedule spans the run.
``eval.py`` then measures the final validation loss with top-k and with causal routing (as at
inference), the causal decision's accuracy, and how routing spends depth.

Resuming: a run whose result file exists under ``results/runs/`` is skipped, so a grid resumes from
what is in git, on any machine; an interrupted run resumes from its ``last.ckpt`` when its run
folder is still there. Each result records the commit, machine and precision it came from.

After the main grid, ``repeat`` trains more seeds at one budget for each variant's best size and
its neighbours, so the report can give a spread (``bench/isoflop_report.py`` does the analysis).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from modlm import ModelConfig
from modlm.flops import forward_flops, training_flops

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Run:
    variant: str
    size: str
    budget: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.variant}-{self.size}-{self.budget:.1e}-s{self.seed}".replace("+", "")


class Grid:
    """A grid file, read and checked."""

    def __init__(self, path: Path):
        spec = yaml.safe_load(path.read_text())
        self.path = path
        self.name = spec["name"]
        self.results = REPO / spec["results"]
        self.run_root = REPO / spec["run_root"]
        self.train: dict = spec["train"]
        self.warmup_fraction = float(spec.get("warmup_fraction", 0.1))
        self.validations = int(spec.get("validations", 8))
        self.sizes: dict[str, dict] = spec["sizes"]
        self.budgets: dict[float, list[str]] = {float(b): sizes for b, sizes in spec["budgets"].items()}
        self.variants: dict[str, dict] = spec["variants"]
        self.seeds: list[int] = spec.get("seeds", [1234])
        self.repeat: dict | None = spec.get("repeat")
        for budget, sizes in self.budgets.items():
            for size in sizes:
                if size not in self.sizes:
                    raise SystemExit(f"{path}: budget {budget:g} names unknown size {size!r}")
        for size in self.sizes:
            for variant in self.variants:
                self.model_config(size, variant)  # fail now on an impossible shape, not hours in
        self.seq_len = int(self.train["data.seq_len"])
        self.batch_size = int(self.train["data.batch_size"])

    def model_fields(self, size: str, variant: str) -> dict:
        return {**self.sizes[size], **self.variants[variant]}

    def model_config(self, size: str, variant: str, vocab_size: int | None = None) -> ModelConfig:
        vocab = vocab_size or int(self.train["data.vocab_size"])
        return ModelConfig(
            vocab_size=vocab, max_seq_len=int(self.train["data.seq_len"]), **self.model_fields(size, variant)
        )

    def flops_per_step(self, size: str, variant: str, vocab_size: int | None = None) -> int:
        return self.batch_size * training_flops(self.model_config(size, variant, vocab_size), self.seq_len)

    def steps(self, run: Run) -> int:
        return max(1, round(run.budget / self.flops_per_step(run.size, run.variant)))

    def result_file(self, run: Run) -> Path:
        return self.results / "runs" / f"{run.id}.json"

    def main_runs(self) -> list[Run]:
        """Budget by budget (smallest first), sizes interleaved across variants."""
        return [
            Run(variant, size, budget, seed)
            for budget in sorted(self.budgets)
            for size in self.budgets[budget]
            for variant in self.variants
            for seed in self.seeds
        ]

    def repeat_runs(self, finished: list[dict]) -> list[Run]:
        """More seeds for each variant's best size (first seed, finished runs) and its neighbours."""
        if not self.repeat:
            return []
        budget = float(self.repeat["budget"])
        sizes = self.budgets[budget]
        runs = []
        for variant in self.variants:
            done = {
                r["size"]: r["causal_loss"]
                for r in finished
                if r["variant"] == variant and r["budget"] == budget and r["seed"] == self.seeds[0]
            }
            if set(done) != set(sizes):
                continue  # the curve is not complete yet: its optimum is unknown
            best = sizes.index(min(done, key=done.get))
            k = int(self.repeat.get("neighbours", 1))
            for size in sizes[max(0, best - k) : best + k + 1]:
                runs += [Run(variant, size, budget, seed) for seed in self.repeat["seeds"]]
        return runs


def finished_results(grid: Grid) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((grid.results / "runs").glob("*.json"))]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


CODE_PATHS = ("src", "train.py", "eval.py", "bench/isoflop.py")
"""What a result depends on: the model, training and evaluation code, and this harness."""


def commit_of_code() -> str:
    """The newest commit that changed the code a run uses (``+dirty`` with local changes to it).

    Not HEAD: with ``--commit`` each result is a commit of its own, so HEAD would name the previous
    result rather than the code.
    """
    last = subprocess.run(
        ["git", "rev-list", "-1", "HEAD", "--", *CODE_PATHS], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", *CODE_PATHS], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return last + ("+dirty" if dirty else "")


def train_command(grid: Grid, run: Run, steps: int, directory: Path) -> list[str]:
    every = max(1, steps // grid.validations)
    flags = {
        **grid.train,
        "seed_everything": run.seed,
        "trainer.default_root_dir": directory,
        "trainer.max_steps": steps,
        "trainer.val_check_interval": every,
        "trainer.enable_progress_bar": "false",
        "model.warmup_steps": max(1, round(grid.warmup_fraction * steps)),
        "checkpoint.every_n_train_steps": max(1, steps // 4),  # resumable, at most a quarter lost
        **{f"model.{k}": v for k, v in grid.model_fields(run.size, run.variant).items()},
    }
    return [sys.executable, str(REPO / "train.py"), "fit"] + [f"--{k}={v}" for k, v in flags.items()]


def tensorboard_series(directory: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every TensorBoard events file under ``directory`` (resumed runs write several)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for events in sorted(directory.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return series


def run_one(grid: Grid, run: Run, eval_device: str, commit: bool) -> dict:
    result_file = grid.result_file(run)
    if result_file.exists():
        return json.loads(result_file.read_text())
    directory = grid.run_root / run.id
    directory.mkdir(parents=True, exist_ok=True)
    steps = grid.steps(run)
    last = directory / "checkpoints" / "last.ckpt"
    timing_file = directory / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {"train_s": 0.0, "segments": 0}
    cmd = train_command(grid, run, steps, directory)
    if last.exists():
        cmd.append(f"--ckpt_path={last}")
    print(f"[{run.id}] {steps} steps" + (" (resuming)" if last.exists() else ""), flush=True)
    start = time.perf_counter()
    with open(directory / "train.log", "a") as log:
        status = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    timing["train_s"] += time.perf_counter() - start
    timing["segments"] += 1
    timing_file.write_text(json.dumps(timing))
    if status != 0:
        raise SystemExit(f"train.py failed with status {status}; see {directory / 'train.log'}")

    eval_json = directory / "eval.json"
    status = subprocess.run(
        [
            sys.executable,
            str(REPO / "eval.py"),
            str(last),
            "--json",
            str(eval_json),
            "--quiet",
            "--decode_tokens",
            "16",
            "--device",
            eval_device,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    ).returncode
    if status != 0:
        raise SystemExit(f"eval.py failed with status {status} on {last}")
    ev = json.loads(eval_json.read_text())
    vocab = torch.load(last, map_location="cpu", weights_only=True)["hyper_parameters"]["vocab_size"]
    result = summarize(grid, run, steps, vocab, ev, tensorboard_series(directory), timing)
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    for stale in (directory / "checkpoints").glob("step=*.ckpt"):
        if stale.resolve() != last.resolve():  # last.ckpt may be a link to the newest step
            stale.unlink()  # the final model is all a later look needs; the grid is many runs
    print(
        f"[{run.id}] top-k {result['topk_loss']:.4f}  causal {result['causal_loss']:.4f}  "
        f"{result['train_wall_s'] / 60:.1f} min",
        flush=True,
    )
    if commit:
        git_commit(result_file, f"isoflop {grid.name}: {run.id} (causal loss {result['causal_loss']:.4f})")
    return result


def summarize(grid: Grid, run: Run, steps: int, vocab: int, ev: dict, series: dict, timing: dict) -> dict:
    """One run's record: what the analysis needs, small enough to keep in git."""
    cfg = grid.model_config(run.size, run.variant, vocab)
    rates = list(series.get("train/device/batches_per_sec", {}).values())
    median_step_s = 1.0 / statistics.median(rates) if rates else float("nan")
    val, val_causal = series.get("val/loss", {}), series.get("val/loss_causal", series.get("val/loss", {}))
    routed = cfg.routed_layers

    def pick(mode, name):
        return {str(i): ev[f"{mode}.{name}.layer_{i}"] for i in routed if f"{mode}.{name}.layer_{i}" in ev}

    return {
        "id": run.id,
        "variant": run.variant,
        "size": run.size,
        "budget": run.budget,
        "seed": run.seed,
        "model": grid.model_fields(run.size, run.variant),
        "vocab_size": vocab,
        "params": ev["params"],
        "steps": steps,
        "tokens": steps * grid.batch_size * grid.seq_len,
        "train_flops": steps * grid.flops_per_step(run.size, run.variant, vocab),
        "forward_flops_per_token_topk": forward_flops(cfg, grid.seq_len) / grid.seq_len,
        "forward_flops_per_token_causal": ev["flops_per_token"],
        "topk_loss": ev["topk.loss"],
        "causal_loss": ev["causal.loss"],
        "topk_bpb": ev.get("topk.bpb"),
        "causal_bpb": ev.get("causal.bpb"),
        "causal_capacity_used": ev.get("causal.capacity_used"),
        "causal_acc": pick("causal", "causal_acc"),
        "causal_precision": pick("causal", "causal_precision"),
        "causal_recall": pick("causal", "causal_recall"),
        "overlap_topk": pick("topk", "overlap"),
        "overlap_causal": pick("causal", "overlap"),
        "depth_topk": [ev[f"topk.depth.{d}"] for d in range(cfg.n_layers + 1)],
        "depth_causal": [ev[f"causal.depth.{d}"] for d in range(cfg.n_layers + 1)],
        # validation curve: optimizer step (1-based) -> loss; time = steps x median step time
        "val_curve": [[s + 1, val[s], val_causal.get(s, val[s])] for s in sorted(val)],
        "median_step_s": median_step_s,
        "train_wall_s": timing["train_s"],
        "segments": timing["segments"],
        "precision": grid.train.get("trainer.precision"),
        "machine": machine(),
        "commit": commit_of_code(),
        "date": time.strftime("%Y-%m-%d"),
    }


def git_commit(path: Path, message: str) -> None:
    """Commit one result file where it lies (its own repository), leaving everything else alone.
    A failure (another git command holding the lock, a merge in progress) is reported, not fatal:
    the file is there and the next commit of the folder takes it."""
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path.parent, capture_output=True, text=True)
    if top.returncode != 0:
        print(f"  (not committed: {path} is not in a git repository)", flush=True)
        return
    for _ in range(3):
        subprocess.run(["git", "add", "--", str(path)], cwd=path.parent, capture_output=True)
        done = subprocess.run(
            ["git", "commit", "-q", "-m", message, "--", str(path)], cwd=path.parent, capture_output=True, text=True
        )
        if done.returncode == 0:
            return
        time.sleep(5)
    print(f"  (not committed: {done.stderr.strip()[:200]})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", type=Path, help="the grid file (YAML)")
    p.add_argument("--results", type=Path, help="where result files go (default: the grid file's `results`)")
    p.add_argument("--report", action="store_true", help="only gather finished runs into the table and plots")
    p.add_argument("--commit", action="store_true", help="git-commit each result file as its run finishes")
    p.add_argument("--only", nargs="+", help="run only these variants")
    p.add_argument("--budgets", type=float, nargs="+", help="run only these budgets")
    p.add_argument("--no-repeat", action="store_true", help="skip the extra seeds")
    p.add_argument("--eval-device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    grid = Grid(args.grid)
    if args.results:
        grid.results = args.results.resolve()
    if not args.report:

        def keep(r):
            return (not args.only or r.variant in args.only) and (not args.budgets or r.budget in args.budgets)

        for run in filter(keep, grid.main_runs()):
            run_one(grid, run, args.eval_device, args.commit)
        if not args.no_repeat:
            for run in filter(keep, grid.repeat_runs(finished_results(grid))):
                run_one(grid, run, args.eval_device, args.commit)

    import isoflop_report  # beside this file

    isoflop_report.report(finished_results(grid), grid.results, title=f"isoFLOP curves ({grid.name})")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
