"""The static one-token step of a mixture of experts: every expert in place against each pick's gathered weights.

    python bench/moe_decode.py --threads 1 --reps 9 --json bench/results/moe_decode_cpu.json
    python bench/moe_decode.py --device cuda --precision bf16 --json $OUT/moe_decode.json

A decoding step that may not read its picks on the host (a compiled step, any accelerator) runs
the mixture with static shapes. modlm's path (``MixtureOfExperts._every_expert``) runs every expert
on the step's tokens, reading each expert's weights in place, and weighs the outputs by the gates;
the path it replaced, written out below (``gathered``), ran each pick through its own expert's
weights, gathered per step: a (B * k, out, in) copy of every matrix. Both are timed on the same
module and inputs, in turn (A, B, A, B, ...), medians of ``--reps`` repetitions of ``--calls``
calls each, at every batch and (experts, top-k) shape given: the mixture alone, one token per row,
as a decoding step calls it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from modlm import ModelConfig
from modlm.model.config import STATIC, Routing
from modlm.model.moe import MixtureOfExperts

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def gathered(moe: MixtureOfExperts, x, expert, gate, real) -> torch.Tensor:
    """The former static step: each pick through its expert's weights, gathered for this step."""
    B, n, k = expert.shape
    flat = x.reshape(B * n, 1, -1).expand(-1, k, -1).reshape(B * n * k, -1)
    ids = torch.where(real, expert, 0).flatten()

    def per_pick(linear, v):
        return torch.bmm(v.unsqueeze(1), linear.weight[ids].transpose(1, 2)).squeeze(1)

    if moe.gated:
        out = per_pick(moe.down, F.silu(per_pick(moe.gate, flat)) * per_pick(moe.up, flat))
    else:
        out = per_pick(moe.down, F.gelu(per_pick(moe.up, flat)))
    weight = (gate * real).to(out.dtype).reshape(B * n * k, 1)
    return (out * weight).view(B, n, k, -1).sum(dim=2)


def picks(moe: MixtureOfExperts, x: torch.Tensor):
    """What the mixture's forward hands its static path: picks, gates, and which picks are real."""
    gate, expert = moe.scores(x).topk(moe.cfg.expert_top_k, dim=-1)
    return expert, gate, expert < moe.n_experts


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timer(moe: MixtureOfExperts, x: torch.Tensor, path: str, calls: int, device: str, dtype):
    """A function timing ``calls`` static steps of ``moe`` on ``x`` through ``path``."""
    step = moe._every_expert if path == "every expert" else (lambda *a: gathered(moe, *a))

    def run() -> float:
        with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            moe._every_expert = step  # the module's static path, for this timing
            try:
                sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    moe(x, Routing.CAUSAL, policy=STATIC)
                sync(device)
                return (time.perf_counter() - start) / calls
            finally:
                del moe._every_expert

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 8], help="real experts per mixture")
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = PRECISIONS[args.precision]
    rows = []
    for experts in args.experts:
        for top_k in args.top_k:
            torch.manual_seed(0)
            cfg = ModelConfig(d_model=args.d_model, n_experts=experts, expert_top_k=top_k, route_every=0)
            moe = MixtureOfExperts(cfg, layer=0).to(args.device).eval()
            for p in moe.parameters():
                torch.nn.init.normal_(p, std=0.05)
            for batch in args.batches:
                x = torch.randn(batch, 1, args.d_model, device=args.device)
                with torch.inference_mode():
                    new, old = moe(x, Routing.CAUSAL, policy=STATIC)[0], gathered(moe, x, *picks(moe, x))
                    assert torch.allclose(new, old, rtol=1e-3, atol=1e-4 * float(old.abs().max())), "the paths disagree"
                runs = {
                    path: timer(moe, x, path, args.calls, args.device, dtype) for path in ("gathered", "every expert")
                }
                for run in runs.values():
                    run()  # warm-up
                times = {path: [] for path in runs}
                for _ in range(args.reps):
                    for path, run in runs.items():
                        times[path].append(run())
                med = {path: statistics.median(t) for path, t in times.items()}
                rows.append(
                    {
                        "experts": experts,
                        "top_k": top_k,
                        "batch": batch,
                        "us_gathered": 1e6 * med["gathered"],
                        "us_every_expert": 1e6 * med["every expert"],
                        "speedup": med["gathered"] / med["every expert"],
                        "times_s": times,
                    }
                )
                print(
                    f"experts {experts} top-k {top_k} batch {batch}: gathered {rows[-1]['us_gathered']:.0f} us, "
                    f"every expert {rows[-1]['us_every_expert']:.0f} us ({rows[-1]['speedup']:.2f}x)",
                    flush=True,
                )
    print(
        f"\nd_model {args.d_model}, MLP width {cfg.mlp_hidden}, {args.device}, {args.precision}, "
        f"threads {torch.get_num_threads()}\n"
    )
    print("| experts | top-k | batch | gathered us | every expert us | speedup |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['experts']} | {r['top_k']} | {r['batch']} | {r['us_gathered']:.0f} | {r['us_every_expert']:.0f} | "
            f"{r['speedup']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "threads": torch.get_num_threads(), "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
