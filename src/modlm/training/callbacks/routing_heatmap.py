"""A picture of which tokens got compute: routed blocks x positions for one validation sequence.

Every ``every_n_validations`` validation runs, the first sequence of the first validation batch
(the same tokens every time, since validation windows are fixed) is drawn as a heat map: for each
routed block (or recursion step of a Mixture-of-Recursions: R0, R1, ...), one row under top-k
routing and one under causal routing, one column per position (the first ``max_positions``). Logged through the
TensorBoard writer's figure API as the image
``router/heatmap``.

It is drawn to be read at TensorBoard's default card size (about 500 pixels wide): few, large
cells; block names and a position scale in large type; the first tokens of the sequence in the
title instead of one rotated label per column, which no card can show legibly.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from ...analysis.metrics import selections
from .. import tags
from ..batch import split_batch
from ..loggers import tensorboard_writer
from ..telemetry import report_of


def sequence_text(trainer, ids: list[int], limit: int = 40) -> str:
    tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
    if tokenizer is None:
        return ""
    text = tokenizer.decode(ids).replace("\n", "\u23ce")
    return text[:limit] + ("\u2026" if len(text) > limit else "")


def heatmap_figure(rows: list[tuple[str, torch.Tensor]], title: str = "", group: int = 2):
    """A matplotlib figure of (name, (T,) bool) rows: processed cells dark, skipped ones light;
    a white gap after every ``group`` rows so each block's top-k/causal pair reads as one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.stack([r.float() for _, r in rows]).numpy()
    n_rows, n_pos = grid.shape
    fig, ax = plt.subplots(figsize=(4.6, 0.3 * n_rows + 1.25), dpi=100)  # ~460 px: a card's width
    ax.imshow(grid, aspect="auto", cmap="Greens", vmin=-0.15, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(n_rows), [name for name, _ in rows], fontsize=10)
    step = max(1, n_pos // 4)
    ax.set_xticks(range(0, n_pos, step), [str(p) for p in range(0, n_pos, step)], fontsize=10)
    ax.set_xlabel("position in the sequence", fontsize=10)
    for boundary in range(group, n_rows, group) if group > 1 else ():
        ax.axhline(boundary - 0.5, color="white", linewidth=3)
    ax.set_title(title or "tokens processed per routed block (dark = processed)", fontsize=9, loc="left")
    fig.tight_layout()
    return fig


class RoutingHeatmap(Callback):
    def __init__(self, every_n_validations: int = 1, max_positions: int = 32):
        """A heat map of the tokens each routed block processes in one validation sequence.

        Args:
            every_n_validations: Draw it at every this many validation runs.
            max_positions: Show the sequence's first this many positions.
        """
        self.every_n_validations = every_n_validations
        self.max_positions = max_positions
        self._validations = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        report = report_of(outputs)
        topk = selections(report.mixtures) if report is not None else []
        if batch_idx != 0 or trainer.sanity_checking or not topk:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        tokens = split_batch(batch)[0]
        n = min(self.max_positions, tokens.shape[1])
        causal = dict(selections(report.causal_mixtures))
        rows = []
        for name, selected in topk:
            rows.append((f"{name} top-k", selected[0, :n].cpu()))
            if name in causal:
                rows.append((f"{name} causal", causal[name][0, :n].cpu()))
        text = sequence_text(trainer, tokens[0, :n].tolist())
        title = f"processed tokens (dark), step {trainer.global_step}" + (f"\n\u201c{text}\u201d" if text else "")
        group = 2 if len(rows) == 2 * len(topk) else 1
        writer.add_figure(tags.HEATMAP, heatmap_figure(rows, title, group), trainer.global_step, close=True)
