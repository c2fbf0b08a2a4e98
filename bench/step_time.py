"""Training-step and decode speed of MoD vs its dense twin, against the machine's own matmul rate.

    python bench/step_time.py                       # default grid, fp32 and bf16-mixed
    python bench/step_time.py --d-model 256 --seq-len 512 --precision bf16 --reps 7

For each shape: the median time of a full training step (forward, backward, AdamW) of MoD
(capacity 0.125, every other block) and of the dense model, measured in interleaved A/B
repetitions so both see the same machine noise; the analytic training-FLOPs ratio; and the
quotient time_ratio / flops_ratio (1.0 means routing costs nothing beyond its FLOPs; target
<= 1.05). The dense model's achieved FLOP/s is reported as a fraction of a plain square matmul's
rate measured in the same run (target >= 60%). Decode: tokens/s of ``generate`` at the --decode-batch
sizes, MoD and dense interleaved (median of --reps).
Memory: bytes of activations saved for backward (the part of a step's peak that MoD changes);
on a GPU, ``torch.cuda.max_memory_allocated`` as well.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from modlm import ModelConfig, MoDTransformer
from modlm.analysis.evaluate import decode_throughput
from modlm.flops import dense_twin, training_flops

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(dtype: torch.dtype, device: str, n: int, reps: int = 7) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype``: the ceiling a model's FLOP/s is held against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def autocast(device: str, dtype):
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)


class Trainer:
    """One model, its optimizer and a fixed batch: ``step()`` runs one full training step."""

    def __init__(self, cfg: ModelConfig, batch: int, seq_len: int, device: str, dtype, compile: bool = False):
        torch.manual_seed(0)
        self.model = MoDTransformer(cfg).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device == "cuda")
        self.forward = torch.compile(self.model) if compile else self.model
        self.idx = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
        self.device, self.dtype = device, dtype

    def loss(self, eager: bool = False):
        with autocast(self.device, self.dtype):
            out = (self.model if eager else self.forward)(self.idx[:, :-1], targets=self.idx[:, 1:])
        return out.loss + out.aux_loss

    def step(self) -> float:
        sync(self.device)
        t = time.perf_counter()
        self.loss().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t

    def saved_activation_bytes(self) -> int:
        seen, alive = {}, []

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            # Hold the tensor here, as backward would, so no storage is freed and reused (and counted
            # once for two tensors) during the forward. Handing ``t`` itself to the graph instead
            # would make a node own a tensor whose grad_fn is that node: a cycle Python's gc cannot
            # see, which kept every measured forward's activations alive to the end of the run.
            alive.append(t)
            return None

        def unpack(_):
            raise RuntimeError("saved_activation_bytes builds a graph only to count it")

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            loss = self.loss(eager=True)  # saved-tensor hooks need eager autograd
        alive.clear()
        del loss
        return sum(seen.values())


def bench_shape(args, d_model: int, seq_len: int, precision: str, rate: float) -> dict:
    dtype, device = PRECISIONS[precision], args.device
    mod_cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=d_model,
        n_layers=args.layers,
        n_heads=d_model // args.head_dim,
        max_seq_len=seq_len,
        capacity=args.capacity,
        route_every=2,
    )
    cfgs = {"mod": mod_cfg, "dense": dense_twin(mod_cfg)}
    runs = {name: Trainer(cfg, args.batch, seq_len, device, dtype, args.compile) for name, cfg in cfgs.items()}
    for run in runs.values():  # warm-up: allocator, kernels, optimizer state (and compilation)
        for _ in range(3 if args.compile else 2):
            run.step()
    times = {name: [] for name in runs}
    for _ in range(args.reps):  # interleaved A/B so both see the same noise
        for name, run in runs.items():
            times[name].append(run.step())
    med = {name: statistics.median(t) for name, t in times.items()}
    flops = {name: args.batch * training_flops(cfg, seq_len) for name, cfg in cfgs.items()}
    time_ratio = med["mod"] / med["dense"]
    flops_ratio = flops["mod"] / flops["dense"]
    row = {
        "d_model": d_model,
        "seq_len": seq_len,
        "precision": precision,
        "batch": args.batch,
        "compiled": args.compile,
        "step_s_mod": med["mod"],
        "step_s_dense": med["dense"],
        "time_ratio": time_ratio,
        "flops_ratio": flops_ratio,
        "quotient": time_ratio / flops_ratio,
        "dense_flops_per_s": flops["dense"] / med["dense"],
        "matmul_flops_per_s": rate,
        "dense_fraction_of_matmul": flops["dense"] / med["dense"] / rate,
        "act_bytes_mod": runs["mod"].saved_activation_bytes(),
        "act_bytes_dense": runs["dense"].saved_activation_bytes(),
    }
    if device == "cuda":
        for name, run in runs.items():
            torch.cuda.reset_peak_memory_stats()
            run.step()
            row[f"peak_bytes_{name}"] = torch.cuda.max_memory_allocated()
    if args.decode:
        for batch in args.decode_batch:  # MoD and dense interleaved, as every comparison of two models here
            prompt = torch.randint(0, args.vocab, (batch, args.prompt_len), device=device)
            times = {name: [] for name in runs}
            with autocast(device, dtype):
                for run in runs.values():
                    decode_throughput(run.model.eval(), prompt, args.new_tokens, reps=1)  # warm-up
                for _ in range(args.reps):
                    for name, run in runs.items():
                        times[name].append(decode_throughput(run.model, prompt, args.new_tokens, reps=1)["seconds"])
            mod, dense = (batch * args.new_tokens / statistics.median(times[n]) for n in ("mod", "dense"))
            suffix = "" if batch == 1 else f"_batch{batch}"
            row.update(
                {
                    f"decode_tok_s_mod{suffix}": mod,
                    f"decode_tok_s_dense{suffix}": dense,
                    f"decode_speedup{suffix}": mod / dense,
                }
            )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, nargs="+", default=[256, 512])
    p.add_argument("--seq-len", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=["fp32", "bf16"])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--head-dim", type=int, default=32, help="n_heads = d_model // head_dim")
    p.add_argument("--capacity", type=float, default=0.125)
    p.add_argument("--tokens-per-step", type=int, default=4096, help="batch = tokens_per_step // seq_len")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--decode", action="store_true", help="also time generate(), MoD and dense interleaved")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1], help="decode batch sizes (default: 1)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--compile", action="store_true", help="time torch.compile'd models (warm-up includes compiling)")
    p.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="n of the n^3 reference matmul (default 2048 on CPU, 8192 on GPU, where 2048 is too small to reach peak)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/results/step_time.json")
    args = p.parse_args()

    n = args.matmul_size or (8192 if args.device.startswith("cuda") else 2048)
    rates = {
        name: matmul_rate(dtype or torch.float32, args.device, n)
        for name, dtype in PRECISIONS.items()
        if name in args.precision
    }
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "matmul_flops_per_s": rates,
        "matmul_size": n,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    print(
        "| d_model | seq | prec | MoD s | dense s | time ratio | FLOPs ratio | quotient | dense/matmul | act MB "
        "MoD/dense | decode x |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for precision in args.precision:
        for d_model in args.d_model:
            for seq_len in args.seq_len:
                args.batch = max(1, args.tokens_per_step // seq_len)
                r = bench_shape(args, d_model, seq_len, precision, rates[precision])
                rows.append(r)
                print(
                    f"| {d_model} | {seq_len} | {precision} | {r['step_s_mod']:.4f} | {r['step_s_dense']:.4f} | "
                    f"{r['time_ratio']:.3f} | {r['flops_ratio']:.3f} | {r['quotient']:.3f} | "
                    f"{r['dense_fraction_of_matmul']:.0%} | "
                    f"{r['act_bytes_mod'] / 2**20:.0f}/{r['act_bytes_dense'] / 2**20:.0f} | "
                    f"{r.get('decode_speedup', float('nan')):.2f} |",
                    flush=True,
                )
                # written after every shape, so a run cut short keeps what it measured
                Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("matmul rate: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()), f"-> {args.out}")


if __name__ == "__main__":
    main()
