"""``modlm-eval CKPT --tasks T1,T2 [--include_path DIR] [--num_fewshot N] [--limit N] [--batch_size B]
[--routing causal|topk] --json OUT``: lm-evaluation-harness tasks on one model.

CKPT is anything ``modlm-eval`` reads (``saved.load_saved``), scored with its own
tokenizer. What is printed: one line per task and metric; what is written: every number under flat
dotted keys (``modlm.analysis.harness.tasks``), the JSON written whole at the end (a hidden name, then
a rename), so a failed run leaves no partial file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..analysis.harness import HarnessError, evaluate_tasks
from ..model.version import __version__, describe
from ..saved import load_saved


def write_json_atomically(path: Path, payload: dict) -> None:
    """``payload`` as JSON at ``path``, all or nothing: written under a hidden name beside it, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    os.replace(partial, path)


SPENT = ("samples", "num_fewshot", "tokens", "flops_per_token", "capacity_used", "leaking")
"""Per-task keys that are not lm-eval's metrics."""


def summary(result: dict) -> str:
    """One line per task (or group) and metric, ``task  metric  value +- stderr``; then the run's
    routing, FLOPs per token and capacity used."""
    tasks = sorted(key.split(".")[1] for key in result if key.startswith("harness.") and key.endswith(".num_fewshot"))
    lines = []
    for task in tasks:
        prefix = f"harness.{task}."
        for key, value in result.items():
            metric = key.removeprefix(prefix)
            if metric == key or metric.split(".")[0] in SPENT or metric.endswith("_stderr"):
                continue
            stderr = result.get(f"{key}_stderr")
            spread = f" +- {stderr:.4f}" if isinstance(stderr, float) else ""
            lines.append(f"{task:<24} {metric:<24} {value:.4f}{spread}")
    leaking = " (leaking: top-k routing sees each scored continuation)" if result["harness.leaking"] else ""
    used = f", capacity used {result['harness.capacity_used']:.3f}" if "harness.capacity_used" in result else ""
    lines.append(
        f"routing {result['harness.routing']}{leaking}, "
        f"forward FLOPs/token {result['harness.flops_per_token']:.4g}{used}"
    )
    return "\n".join(lines)


def execute_tasks(run) -> int:
    """Score ``run.ckpt`` on ``run.tasks`` (``run``: ``modlm.cli.eval.EvalRun``); print the figures,
    write ``run.json``."""
    if run.compare or run.export or run.push_to_hub:
        raise HarnessError(
            "--tasks scores one model: leave out --compare, --export and --push_to_hub (run those without --tasks)"
        )
    if run.batch_size < 1:
        raise HarnessError(f"--batch_size {run.batch_size} is invalid: must be at least 1")
    if run.quiet:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    saved = load_saved(run.ckpt, run.device)
    if saved.tokenizer is None:
        raise HarnessError(
            f"{run.ckpt} carries no tokenizer (its run's data module was not modlm's): the harness needs the "
            "model's own tokenizer"
        )
    model = saved.model
    if run.decision:
        model.config.causal_decision = run.decision
    autocast = torch.autocast(run.device.split(":")[0], dtype=torch.bfloat16, enabled=run.precision == "bf16")
    with autocast:
        figures = evaluate_tasks(
            model,
            saved.tokenizer,
            run.tasks,
            include_path=run.include_path,
            num_fewshot=run.num_fewshot,
            limit=run.limit,
            batch_size=run.batch_size,
            routing=run.routing,
            progress=not run.quiet,
        )
    result = {
        "checkpoint": str(run.ckpt),
        "modlm_version": __version__,
        "written_by": saved.written_by,
        "params": model.num_params(),
        "routed_layers": model.config.routed_layers,
        **figures,
    }
    print(describe(saved.written_by))
    print(summary(result))
    if run.json:
        write_json_atomically(Path(run.json), result)
        print(f"json: {run.json}")
    return 0
