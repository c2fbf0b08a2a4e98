"""Grouped-query attention under a mask, both ways: a prompt and decoding steps of a GQA model with each
key/value head's query heads folded into query rows (modlm's way on CUDA) and with SDPA's ``enable_gqa``
(its way on the CPU), interleaved, with the attention kernels each one ran.

    python bench/gqa_prefill.py --device cuda --json $OUT/gqa_prefill.json
    python bench/gqa_prefill.py --device cpu --d-model 256 --heads 8 --kv-heads 2 --layers 2 --batch 2 --prompt 128

A dense model shaped like an imported Llama (``--heads`` query heads, ``--kv-heads`` key/value
heads of 64 dimensions), in ``--dtype``. Each repetition times, for each way in turn: a
``--batch`` x ``--prompt`` prefill into a fresh state (its allocation not timed), then ``--new``
decoding steps; medians over ``--reps``. Every masked attention call goes through
``modlm.model.layers.masked_attention``; the way is chosen by switching ``fold_query_groups``. The
kernels: torch's profiler over one prefill per way, counting the ``aten::_scaled_dot_product_*``
operators (flash, efficient (memory-efficient), cudnn, or ``_math``: the math path) it dispatched.
On CUDA, the peak memory of one prefill per way as well: the math path holds (B, H, T, S) fp32
scores.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from modlm import ModelConfig, MoDTransformer
from modlm.model import layers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WAYS = {"folded": True, "enable_gqa": False}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Way:
    """Masked attention one way (``fold_query_groups`` answering ``fold``) while inside."""

    def __init__(self, fold: bool):
        self.fold = fold

    def __enter__(self):
        self.original = layers.fold_query_groups
        layers.fold_query_groups = lambda device: self.fold

    def __exit__(self, *exc):
        layers.fold_query_groups = self.original


@torch.inference_mode()
def run(model: MoDTransformer, prompts: torch.Tensor, new: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decoding step)."""
    device = prompts.device
    state = model.new_state(prompts.size(0))
    sync(device)
    start = time.perf_counter()
    token = model.prefill(prompts, state, last_only=True).argmax(-1)
    sync(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new):
        token = model.decode_step(token, state).argmax(-1)
    sync(device)
    return prefill, (time.perf_counter() - start) / max(1, new)


@torch.inference_mode()
def kernels(model: MoDTransformer, prompts: torch.Tensor) -> dict[str, int]:
    """The SDPA operators one prefill dispatched, by name."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if prompts.is_cuda else [])
    with profile(activities=activities) as prof:
        model.prefill(prompts, model.new_state(prompts.size(0)))
        sync(prompts.device)
    return dict(collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")))


@torch.inference_mode()
def peak_bytes(model: MoDTransformer, prompts: torch.Tensor) -> int | None:
    if not prompts.is_cuda:
        return None
    state = model.new_state(prompts.size(0))
    sync(prompts.device)
    torch.cuda.reset_peak_memory_stats(prompts.device)
    base = torch.cuda.memory_allocated(prompts.device)
    model.prefill(prompts, state)
    sync(prompts.device)
    return torch.cuda.max_memory_allocated(prompts.device) - base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 elsewhere")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=8192,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        head_size=args.d_model // args.heads,
        max_seq_len=args.prompt + args.new + 1,
        route_every=0,
    )
    model = MoDTransformer(cfg).to(device=device, dtype=dtype).eval()
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    prompts = prompts.to(device)

    seen, peaks, logits = {}, {}, {}
    for way, fold in WAYS.items():
        with Way(fold):
            run(model, prompts, 2)  # warm-up
            seen[way] = kernels(model, prompts)
            peaks[way] = peak_bytes(model, prompts)
            with torch.inference_mode():
                logits[way] = model.prefill(prompts, model.new_state(args.batch), last_only=True).float()
    difference = float((logits["folded"] - logits["enable_gqa"]).abs().max() / logits["enable_gqa"].abs().max())

    times = {way: ([], []) for way in WAYS}
    for _ in range(args.reps):
        for way, fold in WAYS.items():  # interleaved: both ways see the same machine
            with Way(fold):
                prefill, step = run(model, prompts, args.new)
            times[way][0].append(prefill)
            times[way][1].append(step)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"GQA model: d {args.d_model}, {args.layers} layers, {args.heads} query / {args.kv_heads} key-value heads, "
        f"{str(dtype).removeprefix('torch.')}, batch {args.batch}, prompt {args.prompt}, {where}; "
        f"largest logit difference between the ways {difference:.1e} (relative)\n"
    )
    print("| way | prefill ms | decode ms/step | prefill peak MiB | SDPA operators (one prefill) |")
    print("|---|---|---|---|---|")
    rows = []
    for way in WAYS:
        prefill, step = (1e3 * statistics.median(t) for t in times[way])
        peak = peaks[way]
        rows.append(
            {
                "way": way,
                "prefill_ms": prefill,
                "decode_ms_per_step": step,
                "prefill_peak_bytes": peak,
                "sdpa_operators": seen[way],
                "times_s": times[way],
            }
        )
        ops = ", ".join(f"{name.removeprefix('aten::')} x{count}" for name, count in sorted(seen[way].items()))
        print(f"| {way} | {prefill:.2f} | {step:.3f} | {'-' if peak is None else f'{peak / 2**20:.0f}'} | {ops} |")
    speedup = {
        "prefill": rows[1]["prefill_ms"] / rows[0]["prefill_ms"],
        "decode": rows[1]["decode_ms_per_step"] / rows[0]["decode_ms_per_step"],
    }
    print(f"\nfolded over enable_gqa: prefill {speedup['prefill']:.2f}x, decode {speedup['decode']:.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "device": where,
                    "torch": torch.__version__,
                    "dtype": str(dtype),
                    "max_relative_logit_difference": difference,
                    "speedup_folded": speedup,
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
