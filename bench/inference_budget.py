"""How much of its capacity a trained MoD model's routed blocks use at inference, per causal decision.

    python bench/inference_budget.py --checkpoint runs/default/checkpoints/last.ckpt \\
        --dense runs/dense/checkpoints/last.ckpt --out bench/results/inference_budget.json

For each causal decision (``plain``: the predictor's logit > 0 as trained; ``calibrated``: above a
per-block threshold set on held-out windows; ``controlled``: that threshold steered along each
sequence to keep the share at the capacity), per routed block:

* on the validation windows: the share processed, the decision's accuracy / precision / recall
  against top-k membership of the same pass, and the causal loss against the top-k one;
* on the model's own continuations of validation prompts (greedy, and sampled at temperature 0.8,
  top-k 50): the share of generated tokens processed, and the loss of the continuations under top-k
  routing (the computation the model was trained with; lower means text the model itself finds
  likelier) and under the decision's own causal routing;
* decode tokens/s against the dense twin at batch 1 and 16, measured interleaved in this process
  (MoD, dense, MoD, dense, ...; medians), beside the FLOPs bound at the share measured.

A checkpoint carries its calibrated thresholds (buffers of its routers' decisions); with ``--recalibrate``
it is calibrated here again, on the first ``--calibration-windows`` validation windows.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from modlm.analysis.evaluate import evaluate_routing, generation_share
from modlm.analysis.flops import decode_flops
from modlm.data import ModLMDataModule
from modlm.model.generate import generate
from modlm.saved import load_saved

DECISIONS = ("plain", "calibrated", "controlled")


def windows_of(saved) -> torch.Tensor:
    """The validation windows a checkpoint carries, or its data settings' (an older checkpoint)."""
    if saved.validation_windows is not None:
        return saved.validation_windows
    dm = ModLMDataModule(**{**saved.data, "num_workers": 0})
    return dm.validation_windows


@torch.no_grad()
def continuation_losses(model, sequences: torch.Tensor, prompt_len: int) -> dict:
    """Mean next-token loss of the generated part of ``sequences`` under top-k and causal routing."""
    out = {}
    for routing in ("topk", "causal"):
        logits = model(sequences[:, :-1], routing=routing).logits.float()
        targets = sequences[:, 1:]
        out[routing] = F.cross_entropy(
            logits[:, prompt_len - 1 :].flatten(0, 1), targets[:, prompt_len - 1 :].flatten()
        ).item()
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a trained MoD checkpoint")
    p.add_argument("--dense", help="its dense twin, for the decode speed ratio")
    p.add_argument("--prompts", type=int, default=16, help="validation prompts for generation")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5, help="interleaved decode-speed repetitions")
    p.add_argument("--calibration-windows", type=int, default=64)
    p.add_argument("--recalibrate", action="store_true", help="calibrate again on the checkpoint's windows")
    p.add_argument("--decisions", nargs="+", default=list(DECISIONS), choices=DECISIONS)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="write every figure to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    saved = load_saved(args.checkpoint)
    model, cfg = saved.model, saved.model.config
    windows = windows_of(saved)
    calibrated_here = args.recalibrate
    if calibrated_here:
        model.calibrate(windows[: args.calibration_windows, :-1])
    thresholds = [float(router.decision.threshold) for router in model.routers()]
    dense = load_saved(args.dense).model if args.dense else None
    prompts = windows[: args.prompts, : args.prompt_tokens]
    val = [w.unsqueeze(0) if w.dim() == 1 else w for w in windows.split(16)]
    context = args.prompt_tokens + args.new_tokens // 2

    report = {
        "checkpoint": args.checkpoint,
        "dense": args.dense,
        "thresholds": thresholds,
        "calibrated_here": calibrated_here,
        "routed_layers": cfg.routed_layers,
        "capacity": cfg.capacity,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "decisions": {},
    }
    base = model
    for decision in args.decisions:
        model = base.reconfigured(causal_decision=decision)
        figures = {}
        topk = evaluate_routing(model, val, "topk")
        causal = evaluate_routing(model, val, "causal")
        figures["val"] = {
            "topk.loss": topk["loss"],
            "causal.loss": causal["loss"],
            **{k: v for k, v in causal.items() if k.startswith(("capacity_used", "causal_"))},
        }
        for name, temperature in (("greedy", 0.0), ("sampled", 0.8)):
            share = generation_share(model, prompts, args.new_tokens, temperature=temperature, top_k=50, seed=1)
            sequences = generate(
                model,
                prompts,
                args.new_tokens,
                temperature=temperature,
                top_k=50,
                generator=torch.Generator().manual_seed(1),
            )
            figures[name] = {
                **share,
                **{f"loss_{k}": v for k, v in continuation_losses(model, sequences, args.prompt_tokens).items()},
            }
        if dense is not None:
            for batch in (1, 16):
                rows = prompts[:batch]
                runs = {
                    "mod": lambda rows=rows: generate(model, rows, args.new_tokens, temperature=0),
                    "dense": lambda rows=rows: generate(dense, rows, args.new_tokens, temperature=0),
                }
                for run in runs.values():
                    run()  # warm-up
                times = {k: [] for k in runs}
                for _ in range(args.reps):
                    for key, run in runs.items():
                        times[key].append(timed(run))
                mod_s, dense_s = statistics.median(times["mod"]), statistics.median(times["dense"])
                share = generation_share(model, rows, args.new_tokens, temperature=0)["capacity_used"]
                figures[f"decode_batch{batch}"] = {
                    "mod_tokens_per_s": batch * args.new_tokens / mod_s,
                    "dense_tokens_per_s": batch * args.new_tokens / dense_s,
                    "speedup": dense_s / mod_s,
                    "share": share,
                    "flops_bound": decode_flops(cfg, context) / decode_flops(cfg, context, share),
                    "flops_bound_at_capacity": decode_flops(cfg, context) / decode_flops(cfg, context, cfg.capacity),
                }
        report["decisions"][decision] = figures
        print(json.dumps({decision: figures}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
