"""lm-evaluation-harness tasks on the default MoD/dense pair and the converted model, causal and top-k
routing side by side.

    python bench/harness.py --mod runs/default/checkpoints/last.ckpt --dense runs/dense/checkpoints/last.ckpt \\
        --dense-hf runs/convert/dense-llama --converted runs/convert/full-s1/checkpoints/last.ckpt
    python bench/harness.py table bench/results/harness.json [more.json ...]   # the table again (runs merged)

The tasks are local, built from real text the models were not trained on: the standard library
modules of the validation split (``val_fraction`` 0.05 of the default corpus, by the same hash of the
path), through ``tests/helpers/harness_tasks.py``:

* ``docstring_mc``: ``# <a function's docstring line>\\ndef`` and four function names of its module:
  which follows (lm-eval ``multiple_choice``: ``acc``, ``acc_norm``);
* ``stdlib_ppl``: the first ``--chars`` characters of each module (``loglikelihood_rolling``:
  ``bits_per_byte``, ``word_perplexity``, ``byte_perplexity``);
* ``docstring_gen``: the same prompts, the name generated greedily up to ``(`` (``exact_match``);
* ``next_line``: six lines of a module and four of its lines: which follows (``multiple_choice``);
* ``line_end``: the six lines and the first half of the next, its rest generated up to the end of the
  line (``exact_match``, ``chrf``).

Every model is scored with ``modlm.analysis.harness.evaluate_tasks`` under causal routing and under
top-k (leaking: see docs/evaluation.md); a dense model computes the same in both. ``--dense-hf`` is
the dense run exported as a standard ``LlamaForCausalLM`` folder (``bench/convert.py prepare``):
it must score what the dense checkpoint scores, and so must lm-eval's own ``hf`` model on that folder
(a row of its own); the converted model before any tuning (``route_every=2, capacity=0.125``,
routers at zero) is made from it here. Results:
``--out`` (JSON with the commit and CPU) and the markdown table printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from bench.convert import commit, cpu, load  # noqa: E402
from modlm import MoDTransformer  # noqa: E402
from modlm.analysis.harness import evaluate_tasks  # noqa: E402
from modlm.data.corpus.files import stdlib_files  # noqa: E402
from modlm.data.corpus.split import is_val  # noqa: E402
from modlm.data.tokenizer import load_tokenizer  # noqa: E402
from modlm.saved import load_saved  # noqa: E402
from tests.helpers.harness_tasks import LINE_TASKS, TASKS, write_tasks  # noqa: E402

ROUTINGS = ("causal", "topk")


def held_out_modules(val_fraction: float = 0.05) -> list[Path]:
    """The stdlib modules the default corpus holds out for validation."""
    root, files = stdlib_files()
    return [p for p in files if is_val(p.relative_to(root).as_posix(), val_fraction)]


def models(args) -> dict[str, tuple]:
    """Name -> (model, tokenizer) of every model given."""
    found = {}
    for name, path in (("dense", args.dense), ("mod", args.mod), ("converted", args.converted)):
        if path:
            saved = load_saved(str(path))
            found[name] = (saved.model, saved.tokenizer)
    if args.dense_hf:
        tokenizer = load_tokenizer(Path(args.dense_hf) / "tokenizer.json")
        found["dense-hf"] = (load_saved(str(args.dense_hf)).model, tokenizer)
        torch.manual_seed(0)  # its causal predictors start random (its routers at zero): one fixed draw
        untuned = MoDTransformer.from_hf(args.dense_hf, route_every=2, capacity=0.125).eval()
        found["converted-untuned"] = (untuned, tokenizer)
    return found


def hf_figures(folder: Path, tasks: Path, batch_size: int) -> dict:
    """lm-eval's figures of its ``hf`` model (HFLM) on a transformers folder, under this bench's keys."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from modlm.analysis.harness.tasks import metric_key

    hf = HFLM(pretrained=str(folder), device="cpu", batch_size=batch_size, dtype="float32")
    results = lm_eval.simple_evaluate(
        model=hf,
        tasks=list(TASKS + LINE_TASKS),
        log_samples=False,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
    )
    out = {"harness.routing": "-", "harness.leaking": False}
    for task, metrics in results["results"].items():
        for name, value in metrics.items():
            if metric_key(name) is not None and isinstance(value, float):
                out[f"harness.{task}.{metric_key(name)}"] = value
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mod", type=Path, help="the default MoD run's checkpoint")
    ap.add_argument("--dense", type=Path, help="its dense twin's checkpoint (configs/dense.yaml)")
    ap.add_argument("--dense-hf", type=Path, help="the dense run as a standard transformers folder")
    ap.add_argument("--converted", type=Path, help="the converted and tuned model's checkpoint")
    ap.add_argument("--questions", type=int, default=1000, help="at most this many docstring questions")
    ap.add_argument("--stretches", type=int, default=40, help="at most this many modules for perplexity")
    ap.add_argument("--chars", type=int, default=3000, help="characters of each module for perplexity")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "harness.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    found = models(args)
    modules = held_out_modules()
    result = {
        "commit": commit(),
        "cpu": cpu(),
        "torch": torch.__version__,
        "threads": args.threads,
        "held_out_modules": len(modules),
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        folder = write_tasks(
            Path(scratch),
            questions=args.questions,
            stretches=args.stretches,
            chars=args.chars,
            max_gen_toks=24,
            paths=modules,
            lines=True,
        )
        for task in TASKS + LINE_TASKS:
            result[f"{task}_documents"] = len(json.loads((folder / f"{task}.json").read_text()))
        for name, (model, tokenizer) in found.items():
            for routing in ROUTINGS if model.config.routes_tokens else ("causal",):  # dense: the same in both
                start = time.time()
                figures = evaluate_tasks(
                    model,
                    tokenizer,
                    TASKS + LINE_TASKS,
                    include_path=str(folder),
                    batch_size=args.batch_size,
                    routing=routing,
                )
                figures.update(seconds=time.time() - start, load_after=load())
                result["runs"][f"{name}/{routing}"] = figures
                print(f"{name}/{routing}: {time.time() - start:.0f} s", flush=True)
        if args.dense_hf:  # lm-eval's own hf model on the same folder: what the dense rows must equal
            start = time.time()
            figures = hf_figures(args.dense_hf, folder, args.batch_size)
            result["runs"]["lm-eval-hf/dense-hf"] = {**figures, "seconds": time.time() - start, "load_after": load()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(table(result))
    return 0


def table(result: dict) -> str:
    """The markdown table of a result: one row per model and routing."""
    runs = result["runs"]
    dense = next((r for n, r in runs.items() if n.startswith("dense/")), None)
    lines = [
        "| model | routing | docstring_mc acc | next_line acc_norm | stdlib_ppl bits/byte | docstring_gen exact | "
        "line_end chrF | capacity used | FLOPs/token vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        model, routing = name.split("/")
        used = r.get("harness.capacity_used")
        leak = " (leaking)" if r["harness.leaking"] else ""
        flops = r.get("harness.flops_per_token")
        ratio = f"{flops / dense['harness.flops_per_token']:.3f}" if dense and flops else "-"

        def acc(task, metric="acc"):
            return f"{r[f'harness.{task}.{metric}']:.3f} +- {r[f'harness.{task}.{metric}_stderr']:.3f}"

        lines.append(
            f"| {model} | {routing}{leak} | {acc('docstring_mc')} | {acc('next_line', 'acc_norm')}"
            f" | {r['harness.stdlib_ppl.bits_per_byte']:.4f} | {r['harness.docstring_gen.exact_match']:.3f}"
            f" | {r['harness.line_end.chrf']:.2f} | {'-' if used is None else f'{used:.3f}'} | {ratio} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "table":  # table A.json [B.json ...]: their runs in one table
        parts = [json.loads(Path(p).read_text()) for p in sys.argv[2:]]
        print(table({"runs": {name: run for part in parts for name, run in part["runs"].items()}}))
        raise SystemExit(0)
    raise SystemExit(main())
