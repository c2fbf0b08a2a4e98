"""Why a trained MoD model's routed blocks process a different share of its own text than of validation text.

    python bench/budget_why.py --checkpoint runs/default/checkpoints/last.ckpt --out bench/results/budget_why.json

With the plain causal decision (the predictor's logit > 0, as trained), the model continues
validation prompts (greedy, and sampled at temperature 0.8, top-k 50); then one causal forward over
each whole sequence gives, per routed block and per token, the decision (what decoding did: the
decision is causal, so the forward and the decode agree) and the router's top-k membership over
the same sequence (what top-k routing would have processed). Splitting both by region (prompt,
continuation), by position in the continuation, and by whether the token repeats one of the
previous 32 tokens separates the three reasons a share can move:

* the text: top-k itself gives the continuation more or less than the capacity (top-k picks k per
  sequence, so a sequence's share is fixed, but its split between prompt and continuation is not);
* the predictor's calibration on the model's own samples: its decisions drift from top-k
  membership on generated text more than on validation text;
* repetition and position: generated text repeats itself (greedy especially), and a block's
  predictor may treat repeated tokens alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess

import torch

from modlm.model.generate import generate
from modlm.saved import load_saved


def shares(mask: torch.Tensor, selected: torch.Tensor, topk: torch.Tensor) -> dict:
    """Share of the ``mask``'s tokens the decision processed, the share top-k membership gives them,
    and how often the two agree there."""
    n = int(mask.sum())
    if not n:
        return {"tokens": 0}
    return {
        "tokens": n,
        "decision": float(selected[mask].float().mean()),
        "topk": float(topk[mask].float().mean()),
        "agreement": float((selected == topk)[mask].float().mean()),
    }


def repeats(tokens: torch.Tensor, window: int = 32) -> torch.Tensor:
    """(B, T) bool: the token equals one of the ``window`` tokens before it."""
    out = torch.zeros_like(tokens, dtype=torch.bool)
    for lag in range(1, window + 1):
        out[:, lag:] |= tokens[:, lag:] == tokens[:, :-lag]
    return out


@torch.no_grad()
def breakdown(model, sequences: torch.Tensor, prompt_len: int, eot_id: int) -> dict:
    out = model(sequences, routing="causal")
    length = sequences.size(1)
    position = torch.arange(length).expand_as(sequences)
    generated = position >= prompt_len
    repeated = repeats(sequences)
    regions = {
        "prompt": ~generated,
        "continuation": generated,
        "continuation_first_32": generated & (position < prompt_len + 32),
        "continuation_last_32": position >= length - 32,
        "continuation_repeated": generated & repeated,
        "continuation_novel": generated & ~repeated,
        "continuation_end_of_text": generated & (sequences == eot_id),
    }
    figures = {"repeated_share_of_continuation": float(repeated[generated].float().mean())}
    for info in out.routing:
        figures[f"layer_{info.layer}"] = {
            name: shares(mask, info.selected, info.topk) for name, mask in regions.items()
        }
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    saved = load_saved(args.checkpoint)
    model = saved.model.reconfigured(causal_decision="plain")
    windows = saved.validation_windows
    prompts = windows[: args.prompts, : args.prompt_tokens]
    eot_id = int(saved.data.get("eot_id", 0))
    report = {
        "checkpoint": args.checkpoint,
        "cpu": platform.processor() or platform.machine(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "capacity": model.config.capacity,
        "decision": "plain",
    }
    # validation text of the same length, for comparison: the "continuation" is then real text
    report["validation"] = breakdown(
        model, windows[: args.prompts, : args.prompt_tokens + args.new_tokens], args.prompt_tokens, eot_id
    )
    for name, temperature in (("greedy", 0.0), ("sampled", 0.8)):
        sequences = generate(
            model,
            prompts,
            args.new_tokens,
            temperature=temperature,
            top_k=50,
            generator=torch.Generator().manual_seed(1),
        )
        report[name] = breakdown(model, sequences, args.prompt_tokens, eot_id)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
