"""Mixture-of-Recursions against dense, recursive dense and MoD: the comparison of ``bench/isoflop/mor.yaml``.

    python bench/isoflop.py bench/isoflop/mor.yaml                          # train the grid first
    python bench/mor_compare.py bench/results/isoflop/mor --runs runs/isoflop/mor --decode

Reads the grid's result files (``RESULTS/runs/*.json``) and, where the run folders are still there
(``--runs``), each run's ``eval.json`` for the recursion figures the result files do not keep (the
share of tokens at each recursion depth, each step's capacity in the validation windows and while
the model samples, the KV cache held against a plain model's). Writes ``RESULTS/compare.md``,
``RESULTS/compare.json`` and ``RESULTS/loss_curves.png`` (validation loss against training FLOPs,
each variant at its best size).

Two views, as the paper compares:
- equal training FLOPs: each variant's best size at each budget (seeds averaged where repeated), its
  forward FLOPs per token and its loss against the best plain dense model;
- equal unique parameters: at each size, the models with 4 blocks of weights (the plain 4-block
  model and the three recursive ones, which apply a stack of 2 of their blocks 3 times).

``--decode`` times greedy decoding of every variant's final checkpoint at the ``--decode-budget``
(default: the budget repeated with more seeds), each at its best size and all at one common size,
interleaved (every model once per repetition, so machine noise hits all alike), batch 1 and 16,
medians of ``--reps``, on ``--threads`` threads (one by default). Each row's speed is also given against the dense
model of its own size, timed in the same run. "blocks/token" is the number of blocks a generated
token passes through while the model samples (all its blocks for a dense model), counted from the KV caches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import isoflop_report  # noqa: E402  (beside this file)
from isoflop import CODE_PATHS, Run  # noqa: E402

from modlm.analysis.evaluate import generation_share  # noqa: E402
from modlm.model.generate import generate  # noqa: E402
from modlm.saved import load_saved  # noqa: E402

ORDER = ("dense", "dense_unique", "mod", "recursive_dense", "mor", "mor_shared_kv")
UNIQUE = ("dense_unique", "recursive_dense", "mor", "mor_shared_kv")  # 4 blocks of weights each
COLORS = isoflop_report.COLORS


def recursion_figures(ev: dict) -> dict:
    """What a run's eval.json says about recursion: depth shares, step capacities, KV cache held."""
    pick = lambda prefix: {k[len(prefix) :]: v for k, v in ev.items() if k.startswith(prefix)}  # noqa: E731
    return {
        # eval.json files written before the mixture metrics name it depth_share.depth_<d> say recursion_depth.<d>
        "recursion_depth": pick("causal.recursion_depth.")
        or {k.removeprefix("depth_"): v for k, v in pick("causal.depth_share.").items()},
        "capacity_used_step": pick("causal.capacity_used.step_"),
        "causal_acc_step": pick("causal.causal_acc.step_"),
        "generate_capacity_used_step": pick("generate.capacity_used.step_"),
        "kv_cache_share": ev.get("generate.kv_cache_share"),
        "kv_cache_allocated_share": ev.get("generate.kv_cache_allocated_share"),
        "eval_decode_tokens_per_s": ev.get("decode_tokens_per_s"),
    }


def best_point(curve: list[dict]) -> dict:
    """A curve's best size, chosen on the main seed's losses (as the grid chose where to repeat)."""
    return min(curve, key=lambda p: p["run"]["causal_loss"])


def equal_flops_rows(curves: dict) -> list[dict]:
    """Each variant's best size at each budget. The size is chosen on the main seed's losses, as the
    grid chose where to repeat; its loss is the mean over the seeds trained there. (The minimum over
    sizes of unequal seed counts would favour the sizes trained once: a lucky seed wins.)"""
    rows = []
    for budget in sorted({b for b, _ in curves}):
        best = {v: best_point(c) for (b, v), c in curves.items() if b == budget}
        dense = min(
            (best[v] for v in ("dense", "dense_unique") if v in best), key=lambda p: p["causal_loss"], default=None
        )
        for variant in ORDER:
            curve = curves.get((budget, variant))
            if not curve:
                continue
            point = best[variant]
            rows.append(
                {
                    "budget": budget,
                    "variant": variant,
                    "best_size": point["size"],
                    "params": point["params"],
                    "loss": point["causal_loss"],
                    "topk_loss": point["topk_loss"],
                    "seeds": point["seeds"],
                    "loss_std": point["loss_std"],
                    "loss_min": point["loss_min"],
                    "loss_max": point["loss_max"],
                    "main_seed_loss": point["run"]["causal_loss"],
                    "edge": curve.index(point) in (0, len(curve) - 1),
                    "flops_per_token": point["forward_flops_per_token_causal"],
                    "steps": point["steps"],
                    "sizes": [p["size"] for p in curve],
                    "vs_best_dense": point["causal_loss"] - dense["causal_loss"] if dense else None,
                    "best_dense": f"{dense['variant']} {dense['size']}" if dense else None,
                }
            )
    return rows


def equal_params_rows(curves: dict) -> list[dict]:
    rows = []
    for budget in sorted({b for b, _ in curves}):
        sizes = {p["size"]: p["params"] for v in UNIQUE for p in curves.get((budget, v), [])}
        for size in sorted(sizes, key=sizes.get):
            row = {"budget": budget, "size": size}
            for variant in ("dense",) + UNIQUE:
                point = next((p for p in curves.get((budget, variant), []) if p["size"] == size), None)
                if point:
                    row[variant] = {
                        "params": point["params"],
                        "loss": point["causal_loss"],
                        "seeds": point["seeds"],
                        "flops_per_token": point["forward_flops_per_token_causal"],
                    }
            rows.append(row)
    return rows


def plot_loss_curves(curves: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({b for b, _ in curves})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4.4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        finals = []
        for variant in ORDER:
            curve = curves.get((budget, variant))
            if not curve:
                continue
            best = best_point(curve)
            run = best["run"]
            flops = [s / run["steps"] * run["train_flops"] for s, _, _ in run["val_curve"]]
            ax.plot(
                flops,
                [c for _, _, c in run["val_curve"]],
                "o-",
                ms=3,
                color=COLORS.get(variant),
                label=f"{variant} {best['size']} ({best['params'] / 1e3:.0f}k)",
            )
            finals.append(run["val_curve"][-1][2])
        ax.set_ylim(min(finals) - 0.1, min(finals) + 1.2)
        ax.set_title(f"{budget:.1e} training FLOPs: each variant at its best size (main seed)", fontsize=10)
        ax.set_xlabel("training FLOPs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation loss, causal routing (nats/token)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def blocks_per_token(model, prompts: torch.Tensor, new_tokens: int) -> float:
    """Blocks a generated token passes through, from the caches (sampling as eval does)."""
    cfg = model.config
    if not (cfg.routes_recursion or cfg.routed_layers):
        return float(cfg.n_layers)
    share = generation_share(model, prompts, new_tokens)
    if cfg.routes_recursion:
        steps = sum(share[f"capacity_used.step_{r}"] for r in range(cfg.recursions))
        return cfg.n_layers - cfg.stack_layers * cfg.recursions + cfg.stack_layers * steps
    return cfg.n_layers - len(cfg.routed_layers) * (1 - share["capacity_used"])


def decode_bench(
    checkpoints: dict[tuple[str, str], Path], batches: list[int], prompt_tokens: int, new_tokens: int, reps: int
) -> list[dict]:
    """Interleaved greedy decoding of every checkpoint ((variant, size) -> path) at every batch size:
    median tokens/s, and each row's speed against the dense model of its size at its batch."""
    saved = {key: load_saved(str(path)) for key, path in checkpoints.items()}
    windows = next(iter(saved.values())).validation_windows
    meta = {
        key: {
            "blocks_per_token": blocks_per_token(s.model, windows[:16, :prompt_tokens], new_tokens),
            "params": s.model.num_params(),
        }
        for key, s in saved.items()
    }
    runs = {}
    for batch in batches:
        prompts = windows[:batch, :prompt_tokens]
        for key, s in saved.items():
            runs[key, batch] = (lambda m, p: lambda: generate(m, p, new_tokens, temperature=0))(s.model, prompts)
            with torch.inference_mode():
                runs[key, batch]()  # warm-up
    times = defaultdict(list)
    for rep in range(reps):
        for key, run in runs.items():
            start = time.perf_counter()
            with torch.inference_mode():
                run()
            times[key].append(time.perf_counter() - start)
        print(f"decode repetition {rep + 1}/{reps}", flush=True)
    speed = {key: key[1] * new_tokens / statistics.median(ts) for key, ts in times.items()}
    rows = []
    for ((variant, size), batch), ts in times.items():
        dense = speed.get((("dense", size), batch))
        rows.append(
            {
                "model": f"{variant} {size}",
                "variant": variant,
                "size": size,
                "batch": batch,
                "tokens_per_s": speed[(variant, size), batch],
                "vs_dense_same_size": speed[(variant, size), batch] / dense if dense else None,
                "times_s": ts,
                **meta[variant, size],
            }
        )
    return rows


def code_commit(commit: str) -> str:
    """The last commit at or before ``commit`` that changed the code a run executes (a grid run with
    ``--commit`` at an older harness recorded the result commit before it, which changes no code);
    ``commit`` itself where git does not know it (a clone without the grid's own commits)."""
    found = subprocess.run(
        ["git", "rev-list", "-1", commit.split("+")[0], "--", *CODE_PATHS], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return (found or commit)[:10]


def markdown(flops_rows, params_rows, recursion, decode_rows, results) -> str:
    fmt = isoflop_report.fmt
    machines = sorted({f"{r['machine']['cpu']} ({r['machine']['threads']} threads, {r['precision']})" for r in results})
    commits = sorted({code_commit(c) for c in {r["commit"] for r in results}})
    lines = [
        f"{len(results)} runs; machines: {'; '.join(machines)}; code commits: {', '.join(commits)}",
        "",
        "### Equal training FLOPs: each variant's best size",
        "",
        "| budget | variant | best size (params) | loss (causal) | seeds: mean +- std [min..max] | top-k loss "
        "| vs best dense | fwd FLOPs/token | steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    # the size is the main seed's best; "vs best dense" compares means at the chosen sizes
    for r in flops_rows:
        seeds = (
            f"{r['loss']:.4f} +- {r['loss_std']:.4f} [{r['loss_min']:.4f}..{r['loss_max']:.4f}] (n={r['seeds']})"
            if r["seeds"] > 1
            else "1 seed"
        )
        edge = " (edge)" if r["edge"] else ""
        lines.append(
            f"| {r['budget']:.1e} | {r['variant']} | {r['best_size']}{edge} ({r['params'] / 1e3:.1f}k) | "
            f"{r['loss']:.4f} | {seeds} | {r['topk_loss']:.4f} | {fmt(r['vs_best_dense'], '+.4f')} | "
            f"{r['flops_per_token'] / 1e6:.3f}M | {r['steps']} |"
        )
    verdicts = isoflop_report.spread_verdicts([{**r, "best_loss": r["loss"]} for r in flops_rows])
    if verdicts:
        lines += ["", "### Differences at the repeated budget against the seed spread", "", *verdicts]
    lines += [
        "",
        "### Equal unique parameters: 4 blocks of weights (8-block dense for reference)",
        "",
        "| budget | size | " + " | ".join(("dense (8 blocks)",) + UNIQUE) + " |",
        "|---|---|" + "---|" * (1 + len(UNIQUE)),
    ]
    for r in params_rows:
        cells = [f"{r[v]['loss']:.4f} ({r[v]['params'] / 1e3:.1f}k)" if v in r else "-" for v in ("dense",) + UNIQUE]
        lines.append(f"| {r['budget']:.1e} | {r['size']} | " + " | ".join(cells) + " |")
    if recursion:
        lines += [
            "",
            "### Recursion figures of the routed models (from eval.json, main seed)",
            "",
            "| run | tokens at depth 1/2/3 | step capacity (validation) | step capacity (sampling) "
            "| causal acc per step | KV cache vs plain |",
            "|---|---|---|---|---|---|",
        ]
        for run_id, f in sorted(recursion.items()):
            join = lambda d: " / ".join(f"{v:.3f}" for _, v in sorted(d.items()))  # noqa: E731
            depth = {k: v for k, v in f["recursion_depth"].items() if k != "0"}
            lines.append(
                f"| {run_id} | {join(depth)} | {join(f['capacity_used_step'])} | "
                f"{join(f['generate_capacity_used_step'])} | {join(f['causal_acc_step']) or '-'} | "
                f"{fmt(f['kv_cache_share'], '.3f')} |"
            )
    if decode_rows:
        lines += [
            "",
            "### Greedy decoding (interleaved, median tokens/s)",
            "",
            "| model | params | batch | tokens/s | vs dense of its size | blocks/token |",
            "|---|---|---|---|---|---|",
        ]
        for r in decode_rows:
            lines.append(
                f"| {r['model']} | {r['params'] / 1e3:.1f}k | {r['batch']} | {r['tokens_per_s']:.0f} | "
                f"{fmt(r['vs_dense_same_size'], '.2f')} | {r['blocks_per_token']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="the grid's results folder (holds runs/*.json)")
    p.add_argument("--runs", type=Path, help="the grid's run folders (eval.json, checkpoints)")
    p.add_argument("--decode", action="store_true", help="time decoding of the final checkpoints (needs --runs)")
    p.add_argument(
        "--decode-budget", type=float, help="the budget whose checkpoints are timed (default: the repeated one)"
    )
    p.add_argument("--decode-size", help="the common size every variant is also timed at (default: dense's best)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads while decoding (tiny models: one is fastest)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    results = [json.loads(f.read_text()) for f in sorted((args.results / "runs").glob("*.json"))]
    curves = isoflop_report.points(results)
    flops_rows, params_rows = equal_flops_rows(curves), equal_params_rows(curves)
    recursion, seed = {}, isoflop_report.main_seed(results)
    if args.runs:
        for r in results:
            ev_file = args.runs / r["id"] / "eval.json"
            if r["seed"] == seed and r["model"].get("recursion_routing", "dense") != "dense" and ev_file.exists():
                recursion[r["id"]] = recursion_figures(json.loads(ev_file.read_text()))
    out = args.results / "compare.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    decode_rows = previous.get("decode", [])
    if args.decode:
        repeated = {r["budget"] for r in results if r["seed"] != seed}
        budget = args.decode_budget or max(repeated or {r["budget"] for r in results})
        best = {r["variant"]: r["best_size"] for r in flops_rows if r["budget"] == budget}
        common = args.decode_size or best["dense"]
        sizes = set(best.values()) | {common}
        picks = sorted(
            set(best.items()) | {(v, common) for v in best} | {("dense", s) for s in sizes},
            key=lambda vs: (vs[1] != common, vs[1], ORDER.index(vs[0])),
        )  # the common size first
        checkpoints = {(v, s): args.runs / Run(v, s, budget, seed).id / "checkpoints" / "last.ckpt" for v, s in picks}
        print(
            f"decoding at {budget:.1e}: {', '.join(' '.join(k) for k in checkpoints)} "
            f"(threads {torch.get_num_threads()})",
            flush=True,
        )
        decode_rows = decode_bench(checkpoints, args.batches, args.prompt_tokens, args.new_tokens, args.reps)
        previous["decode_settings"] = {
            "budget": budget,
            "batches": args.batches,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "reps": args.reps,
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"),
        }
    text = markdown(flops_rows, params_rows, recursion, decode_rows, results)
    out.write_text(
        json.dumps(
            {
                **previous,
                "equal_flops": flops_rows,
                "equal_params": params_rows,
                "recursion": recursion or previous.get("recursion", {}),
                "decode": decode_rows,
            },
            indent=1,
        )
        + "\n"
    )
    (args.results / "compare.md").write_text(text)
    plot_loss_curves(curves, args.results / "loss_curves.png")
    print(text)
    print(f"-> {args.results}/compare.md, compare.json, loss_curves.png")


if __name__ == "__main__":
    main()
