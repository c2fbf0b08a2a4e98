"""The operators a training step dispatches, MoD against its dense twin: what MoD adds per step.

    python bench/step_ops.py                          # the default run's shape (d 256, 6 blocks, seq 256, batch 16)
    python bench/step_ops.py --d-model 512 --layers 8 --seq-len 1024 --batch 4

On an accelerator a small model's step time follows the number of kernels it launches, not its
FLOPs: each routing operator (router, top-k, sort, gathers, scatter, predictor) is a launch that a
dense block does not make. This counts the top-level ``aten::`` operators of one full training step
(forward, backward, AdamW) with torch's profiler, by name, for MoD and for dense, and prints the
difference: a figure the machine's load does not change.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.profiler import profile

from modlm import ModelConfig, MoDTransformer
from modlm.analysis.flops import dense_twin


def step_ops(cfg: ModelConfig, batch: int, seq_len: int) -> collections.Counter:
    torch.manual_seed(0)
    model = MoDTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))

    def step():
        out = model(idx[:, :-1], routing="topk", targets=idx[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: lazy state (optimizer moments) is made outside the counted step
    with profile() as prof:
        step()
    counts = collections.Counter()
    for e in prof.events():
        if e.cpu_parent is None and e.name.startswith("aten::"):
            counts[e.name] += 1  # the forward's and the optimizer's operators
        elif e.name.startswith("autograd::engine::evaluate_function: "):
            counts["backward: " + e.name.split(": ", 1)[1]] += 1  # one per backward node
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--out", help="write the counts as JSON")
    args = p.parse_args(argv)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=max(1, args.d_model // 32),
        max_seq_len=args.seq_len,
    )
    mod, dense = step_ops(cfg, args.batch, args.seq_len), step_ops(dense_twin(cfg), args.batch, args.seq_len)
    extra = {name: mod[name] - dense[name] for name in set(mod) | set(dense) if mod[name] != dense[name]}
    per_block = len(cfg.routed_layers)
    print(
        f"operators per training step (top-level aten ops and backward nodes): MoD {sum(mod.values())}, dense "
        f"{sum(dense.values())}, "
        f"MoD adds {sum(mod.values()) - sum(dense.values())} "
        f"({(sum(mod.values()) - sum(dense.values())) / per_block:.1f} "
        f"per routed block, {per_block} routed blocks)"
    )
    for name, n in sorted(extra.items(), key=lambda kv: -abs(kv[1])):
        print(f"  {name:40s} {n:+d}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": vars(args), "mod": dict(mod), "dense": dict(dense)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
