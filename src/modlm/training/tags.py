"""Every TensorBoard tag a run writes, named here once: the module logs its losses under these
names, the callbacks their figures, and the dashboard lays out the same names. (``eval.py``'s JSON
keys are ``modlm.analysis.evaluate``'s.)

  train/loss, train/aux_loss, train/aux_<name>    losses (``train/aux_<name>`` unweighted)
  val/loss, val/ppl, val/loss_causal, ...         validation (``test/...`` for test runs)
  <kind>/<figure>/<where>                         a mixture's figure (``mixture``): the kind's prefix
                                                  (``router``, ``moe``, ``recursion``) and its metrics' key
  <kind>/val_<figure>/<where>                     the same over validation's causal-routing pass
  router/<figure>/layer_<i>                       a routed block's figure
  router/depth_mean, router/depth                 blocks a token passes through
  router/heatmap                                  the image of processed tokens
  recursion/<figure>/step_<r>                     a recursion step's figure (Mixture-of-Recursions)
  recursion/depth_mean, recursion/depth           recursion steps a token takes
  recursion/depth_share/depth_<d>                 share of tokens that took exactly d steps
  moe/<figure>/layer_<i>[/expert_<e>]             a mixture-of-experts MLP's figure
  flops/<figure>                                  FLOPs per step, in total, against dense, MFU
  train/device/items_per_sec, train/device/mfu    Lightning's ThroughputMonitor (items are tokens)
  harness/<task>/<metric>                         lm-evaluation-harness scores (``--harness.tasks``)
"""

from __future__ import annotations

from typing import Optional

TRAIN_LOSS = "train/loss"
TRAIN_AUX_LOSS = "train/aux_loss"
DEPTH_MEAN = "router/depth_mean"
DEPTH_HISTOGRAM = "router/depth"
HEATMAP = "router/heatmap"
RECURSION_DEPTH_MEAN = "recursion/depth_mean"
RECURSION_DEPTH_HISTOGRAM = "recursion/depth"
FLOPS_STEP = "flops/step"
FLOPS_TOTAL = "flops/total"
FLOPS_RATIO = "flops/ratio_vs_dense"
FLOPS_MFU = "flops/mfu"
FLOPS_MEASURED = "flops/measured_per_batch"
FLOPS_ANALYTIC = "flops/analytic_per_batch"
TOKENS_PER_SEC = "train/device/items_per_sec"
DEVICE_MFU = "train/device/mfu"


def train_aux(name: str) -> str:
    """An unweighted auxiliary loss: ``predictor_bce``, ``router_bce``, ``load_balance``."""
    return f"train/aux_{name}"


def eval_loss(stage: str, causal: bool = False) -> str:
    """``val/loss`` (top-k routing) or ``val/loss_causal``; ``stage`` is ``val`` or ``test``."""
    return f"{stage}/loss" + ("_causal" if causal else "")


def eval_ppl(stage: str, causal: bool = False) -> str:
    return f"{stage}/ppl" + ("_causal" if causal else "")


def mixture(prefix: str, key: str, validation: bool = False) -> str:
    """The tag of a mixture's figure: its kind's ``prefix`` and the metrics' ``key`` (``capacity_used.layer_3``
    -> ``router/capacity_used/layer_3``); ``validation``: the figure of validation's causal pass
    (``router/val_capacity_used/layer_3``)."""
    figure, *where = key.split(".")
    return "/".join([prefix, f"val_{figure}" if validation else figure, *where])


def router(figure: str, layer: Optional[int] = None) -> str:
    """``router/<figure>/layer_<i>`` of routed block ``layer``."""
    return mixture("router", f"{figure}.layer_{layer}")


def recursion(figure: str, step: int) -> str:
    """``recursion/<figure>/step_<r>`` of recursion step ``step`` (0-based)."""
    return mixture("recursion", f"{figure}.step_{step}")


def recursion_depth_share(depth: int) -> str:
    """``recursion/depth_share/depth_<d>``: the share of tokens that took exactly ``depth`` steps."""
    return mixture("recursion", f"depth_share.depth_{depth}")


def moe(figure: str, layer: int, expert: Optional[int] = None) -> str:
    """``moe/<figure>/layer_<i>``, with ``/expert_<e>`` for a per-expert figure."""
    return mixture("moe", f"{figure}.layer_{layer}" + ("" if expert is None else f".expert_{expert}"))


def harness(task: str, metric: str) -> str:
    """``harness/<task>/<metric>``: an lm-evaluation-harness figure of ``task`` (``acc``,
    ``word_perplexity``, ``exact_match.strict-match``, ...; ``capacity_used``: the share of the task's
    tokens the routed blocks processed, their mean)."""
    return f"harness/{task}/{metric}"
