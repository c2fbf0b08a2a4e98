"""The isoFLOP analysis: curve minima, seed spread, the two headline claims, table and plots.

    python bench/isoflop_report.py bench/results/isoflop/cpu     # (re)write report.md/json and plots

Reads the result files ``bench/isoflop.py`` writes (``RESULTS/runs/*.json``) and writes
``RESULTS/report.md``, ``RESULTS/report.json``, ``RESULTS/isoflop_curves.png`` (final validation loss
against parameters, one panel per budget, one curve per variant: the paper's isoFLOP figure) and
``RESULTS/loss_vs_time.png`` (validation loss against training time for the best dense and the best
MoD model of each budget).

Conventions: "loss" is the final validation loss in nats per token with causal routing, as the
model runs at inference (for dense models both routing modes are the same computation). A curve's
minimum comes from a parabola in log10(parameters), as the paper fits, through the best measured
size and its neighbour on each side: a parabola through the whole ladder is pulled far off by sizes
that are a nat or more worse (a 4-block model given too few steps), and its vertex can then sit well
below every measured loss. Where the best measured size is the smallest or the largest trained, the
optimum is not bracketed and the best measured point is reported instead (marked). Points with several seeds enter
the fit as
their mean; the spread is mean +- standard deviation and min..max over seeds.

Training time (claim 2, the time plot) is steps x the step time of the run's model shape. A step's
time depends on the shape and variant, not on the budget or the seed, so every run of one shape on
one machine measures the same thing; the report takes the smallest of their medians (the least
disturbed by other work on a shared machine) as that shape's step time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

LEARNED = ("mod", "mod_raw")  # MoD variants whose routing is learned (the claims are about these)
DENSE = ("dense", "dense_1block")  # baselines: the claims compare against the best of them


def best_dense(curves: dict, budget: float) -> dict | None:
    """The best point of any dense curve at ``budget`` (the shallow control included)."""
    points = [p for variant in DENSE for p in curves.get((budget, variant), [])]
    return min(points, key=lambda p: p["causal_loss"]) if points else None


def main_seed(results: list[dict]) -> int:
    """The main grid's seed: the one most runs share (the others are repeats)."""
    seeds = [r["seed"] for r in results]
    return max(set(seeds), key=seeds.count)


def points(results: list[dict]) -> dict[tuple[float, str], list[dict]]:
    """(budget, variant) -> one entry per size, seeds averaged, sorted by parameters. Each entry's
    ``run`` is the main grid's run (``main_seed``), whose curve the time plots use."""
    seed = main_seed(results)
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        by_key[(r["budget"], r["variant"], r["size"])].append(r)
    curves: dict[tuple, list[dict]] = defaultdict(list)
    for (budget, variant, size), runs in by_key.items():
        losses = [r["causal_loss"] for r in runs]
        first = next((r for r in runs if r["seed"] == seed), runs[0])
        curves[(budget, variant)].append(
            {
                **first,
                "causal_loss": statistics.mean(losses),
                "seeds": len(runs),
                "loss_min": min(losses),
                "loss_max": max(losses),
                "loss_std": statistics.stdev(losses) if len(runs) > 1 else 0.0,
                "topk_loss": statistics.mean(r["topk_loss"] for r in runs),
                "run": first,
            }
        )
    return {k: sorted(v, key=lambda p: p["params"]) for k, v in curves.items()}


def fit_minimum(curve: list[dict]) -> dict:
    """Vertex of the parabola in log10(params) through the best point and its two neighbours, where
    the best point has a neighbour on each side; else the best point, marked not bracketed."""
    best = min(curve, key=lambda p: p["causal_loss"])
    i = curve.index(best)
    out = {
        "best_size": best["size"],
        "best_params": best["params"],
        "best_loss": best["causal_loss"],
        "fit_params": None,
        "fit_loss": None,
        "bracketed": False,
        "fit_coeffs": None,
        "fit_range": None,
    }
    if 0 < i < len(curve) - 1:  # a measured point on each side of the best: the parabola opens upwards
        local = curve[i - 1 : i + 2]
        a, b, c = np.polyfit(np.log10([p["params"] for p in local]), [p["causal_loss"] for p in local], 2)
        vertex = -b / (2 * a)
        out.update(
            fit_params=float(10**vertex),
            fit_loss=float(c - b * b / (4 * a)),
            bracketed=True,
            fit_coeffs=[float(a), float(b), float(c)],
            fit_range=[local[0]["params"], local[-1]["params"]],
        )
    return out


def mean_over_layers(d: dict) -> float | None:
    return statistics.mean(d.values()) if d else None


def optimum_rows(curves: dict, times: dict[tuple, float]) -> list[dict]:
    rows = []
    for (budget, variant), curve in sorted(curves.items()):
        fit = fit_minimum(curve)
        best = next(p for p in curve if p["size"] == fit["best_size"])
        rows.append(
            {
                "budget": budget,
                "variant": variant,
                "sizes": len(curve),
                **fit,
                "best_topk_loss": best["topk_loss"],
                "seeds": best["seeds"],
                "loss_std": best["loss_std"],
                "loss_min": best["loss_min"],
                "loss_max": best["loss_max"],
                "forward_flops_per_token": best["forward_flops_per_token_causal"],
                "causal_acc": mean_over_layers(best["causal_acc"]),
                "causal_precision": mean_over_layers(best["causal_precision"]),
                "causal_recall": mean_over_layers(best["causal_recall"]),
                "capacity_used": best["causal_capacity_used"],
                "overlap_topk": best["overlap_topk"],
                "depth_topk": best["depth_topk"],
                "tokens_per_param": best["tokens"] / best["params"],
                "step_s": times[shape_key(best["run"])],
            }
        )
    return rows


def flops_to_match(curves: dict, budget: float) -> list[dict]:
    """Claim 1: the cheapest learned-MoD model (forward FLOPs per token) whose loss is at most the best
    dense model's at this budget, as a fraction of that dense model's forward FLOPs per token."""
    dense = best_dense(curves, budget)
    if dense is None:
        return []
    out = []
    for variant in LEARNED + ("mod_random",):
        matching = [p for p in curves.get((budget, variant), []) if p["causal_loss"] <= dense["causal_loss"]]
        if not curves.get((budget, variant)):
            continue
        cheapest = min(matching, key=lambda p: p["forward_flops_per_token_causal"]) if matching else None
        out.append(
            {
                "budget": budget,
                "variant": variant,
                "dense_variant": dense["variant"],
                "dense_size": dense["size"],
                "dense_loss": dense["causal_loss"],
                "size": cheapest["size"] if cheapest else None,
                "loss": cheapest["causal_loss"] if cheapest else None,
                "flops_fraction": (cheapest["forward_flops_per_token_causal"] / dense["forward_flops_per_token_causal"])
                if cheapest
                else None,
            }
        )
    return out


def shape_key(run: dict) -> tuple:
    machine = run.get("machine", {})
    return run["variant"], run["size"], machine.get("cpu"), machine.get("gpu"), machine.get("threads"), run["precision"]


def step_times(results: list[dict]) -> dict[tuple, float]:
    """Seconds per training step of each model shape (and variant, machine, precision): the smallest
    of its runs' median step times."""
    measured: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        measured[shape_key(r)] += [] if math.isnan(r["median_step_s"]) else [r["median_step_s"]]
    return {key: min(values, default=math.nan) for key, values in measured.items()}


def time_curve(run: dict, step_s: float) -> tuple[list[float], list[float]]:
    """(minutes, causal validation loss) along a run: steps x ``step_s``."""
    return ([s * step_s / 60 for s, _, _ in run["val_curve"]], [c for _, _, c in run["val_curve"]])


def time_to_reach(run: dict, step_s: float, target: float) -> float | None:
    """Minutes until the run's validation loss first reaches ``target`` (linear between validations)."""
    minutes, losses = time_curve(run, step_s)
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return minutes[0]
            t0, t1, l0, l1 = minutes[i - 1], minutes[i], losses[i - 1], loss
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def time_to_match(curves: dict, budget: float, times: dict[tuple, float]) -> list[dict]:
    """Claim 2: how soon the best learned MoD model reaches the best dense model's final loss
    (``times``: step seconds per model shape, from ``step_times``)."""
    dense = best_dense(curves, budget)
    if dense is None:
        return []
    dense = dense["run"]
    dense_step_s = times[shape_key(dense)]
    dense_minutes = time_curve(dense, dense_step_s)[0][-1]
    out = []
    for variant in LEARNED + ("mod_random",):
        if not curves.get((budget, variant)):
            continue
        best = min(curves[(budget, variant)], key=lambda p: p["causal_loss"])["run"]
        minutes = time_to_reach(best, times[shape_key(best)], dense["causal_loss"])
        out.append(
            {
                "budget": budget,
                "variant": variant,
                "size": best["size"],
                "dense_variant": dense["variant"],
                "dense_size": dense["size"],
                "dense_step_s": dense_step_s,
                "step_s": times[shape_key(best)],
                "dense_minutes": dense_minutes,
                "minutes": minutes,
                "time_fraction": minutes / dense_minutes if minutes is not None else None,
            }
        )
    return out


def spread_verdicts(rows: list[dict]) -> list[str]:
    """Pairs of variant optima at a budget with several seeds: does their difference exceed the spread?

    Conservative: "exceeds" only where the difference of the means is larger than the wider of the
    two min..max ranges over seeds. The difference in standard errors (sqrt(sa^2/na + sb^2/nb)) is
    given too, for a reader who prefers that yardstick."""
    lines = []
    by_budget = defaultdict(dict)
    for r in rows:
        if r["seeds"] > 1:
            by_budget[r["budget"]][r["variant"]] = r
    for budget, opt in sorted(by_budget.items()):
        names = sorted(opt)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                ra, rb = opt[a], opt[b]
                diff = ra["best_loss"] - rb["best_loss"]
                spread = max(ra["loss_max"] - ra["loss_min"], rb["loss_max"] - rb["loss_min"])
                se = math.sqrt(ra["loss_std"] ** 2 / ra["seeds"] + rb["loss_std"] ** 2 / rb["seeds"])
                verdict = "exceeds" if abs(diff) > spread else "within"
                lines.append(
                    f"- {budget:.1e}: {a} ({ra['best_size']}) - {b} ({rb['best_size']}) = {diff:+.4f} nats; "
                    f"{verdict} the seed spread (wider min..max range {spread:.4f}); "
                    f"{abs(diff) / se if se else math.inf:.1f} standard errors"
                )
    return lines


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(rows: list[dict], match_flops: list[dict], match_time: list[dict], results: list[dict]) -> str:
    machines = sorted({f"{r['machine']['cpu']} ({r['machine']['threads']} threads, {r['precision']})" for r in results})
    commits = sorted({r["commit"] for r in results})
    lines = [
        f"{len(results)} runs; machines: {'; '.join(machines)}; commits: {', '.join(c[:10] for c in commits)}",
        "",
        "### Optimum of each curve (causal routing)",
        "",
        "| budget | variant | sizes | fitted optimum (params) | fitted loss | best size | best loss (causal) "
        "| seeds: mean +- std [min..max] | top-k loss | fwd FLOPs/token | tokens/param | causal acc / P / R "
        "| capacity used | overlap (top-k) | depth shares (top-k) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fitted = f"{r['fit_params'] / 1e3:.0f}k" if r["bracketed"] else "not bracketed"
        seeds = (
            f"{r['best_loss']:.4f} +- {r['loss_std']:.4f} [{r['loss_min']:.4f}..{r['loss_max']:.4f}] (n={r['seeds']})"
            if r["seeds"] > 1
            else "1 seed"
        )
        acc = (
            f"{r['causal_acc']:.3f} / {r['causal_precision']:.3f} / {r['causal_recall']:.3f}"
            if r["causal_acc"] is not None
            else "-"
        )
        overlap = ", ".join(f"{v:.3f}" for v in r["overlap_topk"].values()) or "-"
        depth = " ".join(f"{d}:{s:.2f}" for d, s in enumerate(r["depth_topk"]) if s > 0.005)
        lines.append(
            f"| {r['budget']:.1e} | {r['variant']} | {r['sizes']} | {fitted} | {fmt(r['fit_loss'], '.4f')} | "
            f"{r['best_size']} ({r['best_params'] / 1e3:.0f}k) | {r['best_loss']:.4f} | {seeds} | "
            f"{r['best_topk_loss']:.4f} | {r['forward_flops_per_token'] / 1e6:.2f}M | "
            f"{r['tokens_per_param']:.1f} | {acc} | {fmt(r['capacity_used'], '.3f')} | {overlap} | {depth} |"
        )
    lines += [
        "",
        "### Claim 1: forward FLOPs per token of the cheapest MoD model that matches the best dense loss",
        "",
        "| budget | variant | best dense, any depth (size, loss) | matching MoD (size, loss) | FLOPs/token vs dense |",
        "|---|---|---|---|---|",
    ]
    for m in match_flops:
        mod = f"{m['size']}, {m['loss']:.4f}" if m["size"] else "none matches"
        lines.append(
            f"| {m['budget']:.1e} | {m['variant']} | {m['dense_size']}, {m['dense_loss']:.4f} | {mod} | "
            f"{fmt(m['flops_fraction'], '.2f')} |"
        )
    lines += [
        "",
        "### Claim 2: training time until the best MoD model reaches the best dense model's final loss",
        "",
        "| budget | variant | best MoD size | best dense size | step s (MoD / dense) | dense run (min) "
        "| MoD reaches it at (min) | time vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in match_time:
        lines.append(
            f"| {m['budget']:.1e} | {m['variant']} | {m['size']} | {m['dense_size']} | "
            f"{m['step_s']:.3f} / {m['dense_step_s']:.3f} | "
            f"{m['dense_minutes']:.1f} | "
            f"{fmt(m['minutes'], '.1f', 'never')} | {fmt(m['time_fraction'], '.2f')} |"
        )
    verdicts = spread_verdicts(rows)
    if verdicts:
        lines += ["", "### Differences between optima against the seed spread", "", *verdicts]
    return "\n".join(lines) + "\n"


ZOOM_NATS = 0.35  # the isoFLOP figure shows this much above each budget's best loss
COLORS = {
    "dense": "tab:gray",
    "dense_1block": "black",
    "mod": "tab:green",
    "mod_raw": "tab:blue",
    "mod_random": "tab:red",
    "dense_unique": "black",
    "recursive_dense": "tab:orange",
    "mor": "tab:cyan",
    "mor_shared_kv": "tab:purple",
}


def plot_curves(curves: dict, rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({b for b, _ in curves})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4.6), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        losses = [p["causal_loss"] for (b, _), curve in curves.items() if b == budget for p in curve]
        # the minima are what the figure is for: sizes far worse than the best sit on the top edge
        top = min(max(losses), min(losses) + ZOOM_NATS)
        labels_at: dict[float, int] = defaultdict(int)  # off-chart labels already at this x: stack them
        for (b, variant), curve in sorted(curves.items()):
            if b != budget:
                continue
            color = COLORS.get(variant)
            x = [p["params"] for p in curve]
            y = [p["causal_loss"] for p in curve]
            err = [[p["causal_loss"] - p["loss_min"] for p in curve], [p["loss_max"] - p["causal_loss"] for p in curve]]
            ax.errorbar(x, y, yerr=err, fmt="o", color=color, label=variant, capsize=3, ms=4)
            fit = next(r for r in rows if r["budget"] == budget and r["variant"] == variant)
            if fit["bracketed"]:
                a, bb, c = fit["fit_coeffs"]
                xs = np.linspace(*np.log10(fit["fit_range"]), 50)
                ax.plot(10**xs, a * xs**2 + bb * xs + c, "-", color=color, alpha=0.6)
                ax.plot([fit["fit_params"]], [fit["fit_loss"]], "*", color=color, ms=12)
            ax.plot(x, [min(v, top) for v in y], ":", color=color, alpha=0.4)
            off = [(px, py) for px, py in zip(x, y) if py > top]
            for px, py in off:
                ax.plot([px], [top], "^", color=color, ms=7)
                ax.annotate(
                    f"{py:.2f}",
                    (px, top),
                    textcoords="offset points",
                    xytext=(-30, -12 - 9 * labels_at[round(math.log10(px), 2)]),
                    fontsize=7,
                    color=color,
                )
                labels_at[round(math.log10(px), 2)] += 1
        span = top - min(losses)
        ax.set_ylim(min(losses) - 0.05 * span, top + 0.05 * span)
        ax.set_xscale("log")
        ax.set_title(f"{budget:.1e} training FLOPs")
        ax.set_xlabel("parameters")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final validation loss, causal routing (nats/token)")
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=9)
    fig.suptitle(
        title + " (star: minimum of the parabola through the best size and its neighbours; "
        "bars: seed min..max; triangles: off the chart, value beside)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_time(curves: dict, times: dict[tuple, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({b for b, _ in curves})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4.2), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for variant in DENSE + LEARNED:
            curve = curves.get((budget, variant))
            if not curve:
                continue
            best = min(curve, key=lambda p: p["causal_loss"])["run"]
            minutes, losses = time_curve(best, times[shape_key(best)])
            ax.plot(minutes, losses, "o-", ms=3, color=COLORS.get(variant), label=f"best {variant}: {best['size']}")
        target = best_dense(curves, budget)
        if target is not None:  # claim 2's finish line: the best dense model's final loss
            ax.axhline(target["causal_loss"], ls="--", lw=0.8, color="black", label="best dense, final")
            ax.set_ylim(top=target["causal_loss"] + 1.0)
        ax.set_title(f"{budget:.1e} training FLOPs")
        ax.set_xlabel("training time: steps x step time of the shape (min)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation loss, causal routing")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def report(results: list[dict], out_dir: Path, title: str = "isoFLOP curves") -> None:
    if not results:
        print(f"no finished runs under {out_dir / 'runs'}")
        return
    times = step_times(results)
    curves = points(results)
    rows = optimum_rows(curves, times)
    budgets = sorted({b for b, _ in curves})
    match_flops = [m for b in budgets for m in flops_to_match(curves, b)]
    match_time = [m for b in budgets for m in time_to_match(curves, b, times)]
    text = markdown(rows, match_flops, match_time, results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(text)
    (out_dir / "report.json").write_text(
        json.dumps({"optima": rows, "flops_to_match": match_flops, "time_to_match": match_time}, indent=1) + "\n"
    )
    plot_curves(curves, rows, out_dir / "isoflop_curves.png", title)
    plot_time(curves, times, out_dir / "loss_vs_time.png")
    print(text)
    print(f"-> {out_dir}/report.md, report.json, isoflop_curves.png, loss_vs_time.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="the grid's results folder (holds runs/*.json)")
    args = p.parse_args()
    runs = [json.loads(f.read_text()) for f in sorted((args.results / "runs").glob("*.json"))]
    report(runs, args.results)


if __name__ == "__main__":
    main()
