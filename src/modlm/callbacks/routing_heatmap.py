"""A picture of which tokens got compute: routed blocks x positions for one validation sequence.

Every ``every_n_validations`` validation runs, the first sequence of the first validation batch
(the same tokens every time, since validation windows are fixed) is drawn as a heat map: one row
per routed block under top-k routing and one under causal routing, one column per position
(the first ``max_positions``), the decoded tokens along the bottom. Logged as the TensorBoard
image ``router/heatmap``.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from .tensorboard import tensorboard_writer


def token_labels(trainer, ids: list[int]) -> list[str]:
    tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
    if tokenizer is None:
        return [str(i) for i in ids]
    return [repr(tokenizer.decode([i]))[1:-1][:8] for i in ids]


def render_heatmap(rows: list[tuple[str, torch.Tensor]], labels: list[str]) -> np.ndarray:
    """Draw (name, (T,) bool) rows as an RGB uint8 image of shape (3, H, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    grid = torch.stack([r.float() for _, r in rows]).numpy()
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(labels)), 0.5 * len(rows) + 1.6), dpi=100)
    ax.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6, family="monospace")
    ax.set_title("tokens processed per routed block (green = processed)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB")).transpose(2, 0, 1)


class RoutingHeatmap(Callback):
    def __init__(self, every_n_validations: int = 1, max_positions: int = 64):
        self.every_n_validations = every_n_validations
        self.max_positions = max_positions
        self._validations = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        topk = getattr(pl_module, "last_routing", None)
        if batch_idx != 0 or trainer.sanity_checking or not topk:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        n = min(self.max_positions, batch.shape[1] - 1)
        rows = [(f"top-k L{i.layer}", i.selected[0, :n].cpu()) for i in topk]
        rows += [(f"causal L{i.layer}", i.selected[0, :n].cpu()) for i in getattr(pl_module, "last_routing_causal", None) or []]
        image = render_heatmap(rows, token_labels(trainer, batch[0, :n].tolist()))
        writer.add_image("router/heatmap", image, trainer.global_step)
