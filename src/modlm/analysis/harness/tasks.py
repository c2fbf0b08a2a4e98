"""lm-evaluation-harness tasks on a modlm model: find them, load them (with one-line errors for a
name that does not exist and for data on an unreachable Hub), run them, and flatten lm-eval's
results into dotted keys beside what the model spent (``usage.py``).

Keys (``harness.`` in front of each; a metric of a filter other than ``none`` keeps the filter's name
after a dot, as ``exact_match.strict-match``):

* ``<task>.<metric>``, ``<task>.<metric>_stderr``: lm-eval's figures of each task and group
  (``acc``, ``acc_norm``, ``word_perplexity``, ``bits_per_byte``, ``exact_match``, ...);
* ``<task>.samples``, ``<task>.num_fewshot``: documents scored, few-shot examples per prompt;
* ``<task>.tokens``, ``<task>.flops_per_token``, ``<task>.capacity_used.layer_<i>`` (or
  ``.step_<r>`` for a recursion), ``<task>.capacity_used``: tokens the model ran for the task,
  forward FLOPs per token, the share of them each routed block processed, their mean;
* ``<task>.leaking``: whether the task's scores let the continuation choose the routing (top-k
  routing of a log-likelihood task);
* ``routing``, ``leaking``, ``tokens``, ``flops_per_token``, ``capacity_used.layer_<i>``: the run's.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path
from typing import Optional, Sequence

from ...model.errors import UserError

HUB_OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


class HarnessError(UserError):
    """A task the harness cannot run: unknown, or its data out of reach."""


def split_names(tasks: str | Sequence[str]) -> list[str]:
    """Task names from ``"a,b"`` or a list; empty entries dropped."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    return [n.strip() for n in names if n and n.strip()]


def task_manager(names: list[str], include_path: Optional[str] = None):
    """lm-eval's ``TaskManager`` that knows ``names``: the include path's tasks alone when they hold
    every name (lm-eval's own index of ~15k tasks takes seconds to build), else lm-eval's with them.
    An unknown name is a ``HarnessError`` naming the closest known ones."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"--include_path {include_path} is not a folder of task YAML files")
    local = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if local is not None and all(n in local.all_tasks or Path(n).is_file() for n in names):
        return local
    manager = TaskManager(include_path=include_path)
    for name in names:
        if name not in manager.all_tasks and not Path(name).is_file():
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise HarnessError(
                f"unknown task {name!r} (not among lm-eval's {len(manager.all_tasks)} tasks, groups and "
                f"tags{' nor in ' + include_path if include_path else ''}){hint}"
            )
    return manager


def hub_unreachable(err: BaseException) -> bool:
    """Whether ``err`` is the Hub being out of reach: ``datasets`` raises ``ConnectionError`` both in
    offline mode and when no network answers (after its retries)."""
    return isinstance(err, ConnectionError)


def load_tasks(names: list[str], manager) -> list:
    """The Task and Group objects of ``names`` (a tag: its tasks), their data loaded; a task whose data
    is on an unreachable Hub is a one-line ``HarnessError``."""
    loaded = []
    for name in names:
        try:
            found = manager.load([name])
        except Exception as err:  # only the Hub being out of reach is the user's to fix here
            if not hub_unreachable(err):
                raise
            entry = manager.task_index.get(name)
            dataset = (entry.cfg or {}).get("dataset_path") if entry is not None else None
            quoted = re.search(r"'([^']+)'", str(err))
            dataset = dataset or (quoted.group(1) if quoted else "a Hub dataset")
            offline = [v for v in HUB_OFFLINE if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
            why = f"offline mode is on ({', '.join(offline)})" if offline else "the Hub cannot be reached"
            raise HarnessError(
                f"task {name}: its data is on the Hugging Face Hub ({dataset}) and {why}; run where the "
                "Hub is reachable, or give a local copy of the task with --include_path"
            ) from None
        groups, tasks = found["groups"], found["tasks"]
        if name in groups:
            loaded.append(groups[name])
        elif name in tasks:
            loaded.append(tasks[name])
        else:  # a tag or a YAML path: its tasks
            loaded.extend(tasks.values())
    return loaded


def quiet_lm_eval() -> None:
    """lm-eval's INFO lines (selected tasks, seeds, building contexts) off; its warnings kept."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_tasks(
    lm,
    tasks: list,
    manager,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    bootstrap_iters: int = 100_000,
) -> dict:
    """``lm_eval.simple_evaluate`` of loaded tasks (``load_tasks``, from ``manager``) on ``lm``: lm-eval's
    result dict. (Without its manager, lm-eval would index all its own tasks again.)"""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
    )


def metric_key(name: str) -> Optional[str]:
    """``acc,none`` -> ``acc``; ``exact_match,strict-match`` -> ``exact_match.strict-match``; None for a
    key that is not a metric (``alias``, ``name``, ``sample_len``)."""
    if "," not in name:
        return None
    metric, filter_name = name.split(",", 1)
    return metric if filter_name == "none" else f"{metric}.{filter_name}"


def flat_results(results: dict, lm) -> dict:
    """lm-eval's results and ``lm``'s usage as flat dotted keys (see this module's docstring)."""
    out: dict = {"harness.routing": lm.mode.name}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for name, value in metrics.items():
                key = metric_key(name)
                if key is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"harness.{task}.{key}"] = value
    for task, counts in (results.get("n-samples") or {}).items():
        out[f"harness.{task}.samples"] = counts.get("effective")
    for task, shots in (results.get("n-shot") or {}).items():
        out[f"harness.{task}.num_fewshot"] = shots
    leaking = False
    for task, usage in lm.usage.tasks.items():
        task_leaks = lm.mode.leaks and bool(usage.request_types - {"generate_until"})
        leaking |= task_leaks
        if task is None:  # requests that name no task: in the run's totals only
            continue
        out.update({f"harness.{task}.{k}": v for k, v in lm.usage.figures(usage).items()})
        out[f"harness.{task}.leaking"] = task_leaks
    out["harness.leaking"] = leaking
    out.update({f"harness.{k}": v for k, v in lm.usage.figures(lm.usage.total()).items()})
    return out


def evaluate_tasks(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    include_path: Optional[str] = None,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: int = 8,
    routing: str = "causal",
    progress: bool = False,
    bootstrap_iters: int = 100_000,
) -> dict:
    """Run lm-eval ``tasks`` on ``model`` (its ``tokenizers.Tokenizer`` beside it) and return the flat
    keys of ``flat_results``."""
    from .lm import ModLMHarness

    names = split_names(tasks)
    if not names:
        raise HarnessError("--tasks names no task (give lm-eval task names, comma-separated)")
    lm = ModLMHarness(model, tokenizer, routing=routing, batch_size=batch_size, progress=progress)
    quiet_lm_eval()
    manager = task_manager(names, include_path)
    loaded = load_tasks(names, manager)
    return flat_results(run_tasks(lm, loaded, manager, num_fewshot, limit, bootstrap_iters), lm)
