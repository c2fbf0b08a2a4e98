"""Lightning's model summary with modlm's FLOPs in its FLOPs column.

Lightning fills the column by running ``example_input_array`` under torch's FLOP counter; a modlm
module has none (its input is the data's windows), so the column and "Total FLOPs" read 0. Here the
``model`` row holds the analytic forward FLOPs of one training batch (``modlm.analysis.flops``:
batch size x window length tokens, top-k routing, exactly what ``FlopCounterMode`` counts), with no
forward pass run. The table is otherwise Lightning's, and so is everything else about the callback.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary

from ...analysis.flops import forward_flops


class _AnalyticSummary(Summary):
    """A summary whose FLOPs are given per top-level layer instead of counted on an example input."""

    def __init__(self, module, max_depth: int, flops: dict[str, int]):
        self._analytic = flops
        super().__init__(module, max_depth=max_depth)

    @property
    def total_flops(self) -> int:
        return sum(self._analytic.values())

    @property
    def flop_counts(self) -> dict[str, dict]:
        return {
            name: ({"analytic": self._analytic[name]} if name in self._analytic else {}) for name in self.layer_names
        }


def batch_forward_flops(trainer, pl_module) -> dict[str, int]:
    """``{"model": FLOPs}`` of one forward pass over a training batch; empty for a module that is not modlm's."""
    cfg = getattr(getattr(pl_module, "model", None), "config", None)
    if cfg is None:
        return {}
    data = trainer.datamodule
    batch_size = getattr(data, "batch_size", None) or 1
    seq_len = getattr(data, "seq_len", None) or cfg.max_seq_len
    # the capacity schedule's k where the run has one (routed_tokens), else the configured capacity's
    routed = getattr(pl_module, "routed_tokens", None)
    tokens = routed(seq_len) if routed is not None else None
    return {"model": forward_flops(cfg, seq_len, tokens_per_routed_block=tokens) * batch_size}


class FlopsModelSummary(ModelSummary):
    """Lightning's ``ModelSummary``, its FLOPs column the analytic forward FLOPs of one training batch."""

    def _summary(self, trainer, pl_module):
        flops = batch_forward_flops(trainer, pl_module)
        if not flops or self._max_depth != 1:
            return super()._summary(trainer, pl_module)
        with warnings.catch_warnings():
            # Mixed precision keeps fp32 weights, which is the 32 bits Lightning then counts: right, not a problem.
            warnings.filterwarnings(
                "ignore", message=r"Precision \S+-mixed is not supported by the model summary", category=UserWarning
            )
            return _AnalyticSummary(pl_module, self._max_depth, flops)
