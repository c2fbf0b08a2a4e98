"""Evaluation results for people: a markdown table and a bar plot of one or more runs.

A result is the flat dict ``modlm.eval_cli.evaluate_checkpoint`` returns (keys such as
``topk.loss``, ``causal.capacity_used``, ``causal.causal_acc.layer_3``).
"""

from __future__ import annotations

from pathlib import Path

ROWS = [
    ("loss (top-k)", "topk.loss", "{:.4f}"),
    ("ppl (top-k)", "topk.ppl", "{:.2f}"),
    ("bpb (top-k)", "topk.bpb", "{:.4f}"),
    ("loss (causal)", "causal.loss", "{:.4f}"),
    ("ppl (causal)", "causal.ppl", "{:.2f}"),
    ("bpb (causal)", "causal.bpb", "{:.4f}"),
    ("capacity used (causal)", "causal.capacity_used", "{:.3f}"),
    ("capacity used (generated)", "generate.capacity_used", "{:.3f}"),
    ("FLOPs / token (causal)", "flops_per_token", "{:.4g}"),
    ("decode tokens/s (batch 1)", "decode_tokens_per_s", "{:.1f}"),
    ("decode tokens/s (batched)", "decode_tokens_per_s_batched", "{:.1f}"),
    ("parameters", "params", "{:,}"),
]
"""(label, key, format) of the table's fixed rows; one row per routed block follows them."""


def run_name(path: str) -> str:
    """An export folder's name, or the run folder a checkpoint sits in (``runs/NAME/checkpoints/x.ckpt``)."""
    p = Path(path)
    return p.name if p.is_dir() else (p.parent.parent.name or p.stem)


def table(results: list[dict]) -> str:
    """One column per result; a missing number shows as ``-``."""
    names = [run_name(r["checkpoint"]) for r in results]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(results)]
    routed = sorted({i for r in results for i in r["routed_layers"]})
    rows = ROWS + [(f"causal acc L{i} (P / R)", f"causal.causal_acc.layer_{i}", "{:.3f}") for i in routed]
    for label, key, fmt in rows:
        cells = []
        for r in results:
            if key not in r:
                cells.append("-")
                continue
            cell = fmt.format(r[key])
            if "causal_acc" in key:
                layer = key.rsplit(".", 1)[1]
                cell += f" ({r[f'causal.causal_precision.{layer}']:.2f} / {r[f'causal.causal_recall.{layer}']:.2f})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], out: Path) -> None:
    """Causal loss, FLOPs per token and decode speed of each result, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [run_name(r["checkpoint"]) for r in results]
    panels = [
        ("causal.loss", "validation loss (causal)"),
        ("flops_per_token", "forward FLOPs / token"),
        ("decode_tokens_per_s", "decode tokens / s"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        ax.bar(names, [r[key] for r in results], color=["tab:green", "tab:gray", "tab:blue"][: len(results)])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
