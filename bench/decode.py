"""Decode speed: modlm dense and MoD against litgpt's GPT at the same shape, in one interleaved run.

    pip install -r bench/requirements.txt                      # litgpt: this benchmark only
    python bench/decode.py                                     # batch 1 and 16, eager
    python bench/decode.py --checkpoint runs/default/checkpoints/last.ckpt --compile --reps 7
    python bench/decode.py --device cuda --compile --compile-mode reduce-overhead --no-litgpt

Every configuration (model x batch x eager/compiled) generates ``--new-tokens`` greedy tokens
after a ``--prompt-tokens`` prompt, once per repetition, all configurations in turn (A, B, C, A,
B, C, ...), so machine noise hits them alike; the table gives each one's median tokens/s (all
rows' generated tokens, prefill included) and ratios measured within the run. On a GPU every
timing waits for the device (``torch.cuda.synchronize``) before the clock starts and stops.

Models: litgpt's ``GPT`` (``generate`` at batch 1, ``batched_generate_fn`` at batch > 1, each
with its own KV cache) configured like modlm's (RMSNorm, SwiGLU MLP of the same width, RoPE, no
biases, 8 heads); modlm's dense model; modlm MoD untrained (its causal predictor starts at the
base rate, so routed blocks process almost nothing: the overhead floor) and, with
``--checkpoint``, a trained MoD model. For MoD rows, ``routed`` is the fraction of decoding
steps a routed block processed, and ``flops ratio`` what per-token FLOPs predict against dense.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from modlm import ModelConfig, MoDTransformer
from modlm.analysis.flops import decode_flops
from modlm.model.generate import compile_decode_step, generate
from modlm.saved import load_saved


# --- models ------------------------------------------------------------------------------------------
def litgpt_twin(cfg: ModelConfig):
    """litgpt's GPT at modlm's shape. litgpt has no tied embeddings: its LM head is a separate
    matrix (more parameters, the same FLOPs per token)."""
    from litgpt.config import Config
    from litgpt.model import GPT

    config = Config(
        block_size=cfg.max_seq_len,
        vocab_size=cfg.vocab_size,
        padded_vocab_size=cfg.vocab_size,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_query_groups=cfg.n_heads,
        n_embd=cfg.d_model,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=cfg.norm_eps,
        mlp_class_name="LLaMAMLP",
        intermediate_size=cfg.mlp_hidden,
        rope_base=int(cfg.rope_theta),
    )
    return GPT(config).eval()


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def timed(run: Callable[[], None], device: torch.device) -> float:
    """Seconds ``run()`` takes, the device's queued work included (a GPU runs behind the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# --- runners: each returns a function that generates for a fixed batch of prompts ---------------------
def modlm_runner(
    model: MoDTransformer, prompts: torch.Tensor, new_tokens: int, compiled: bool, mode: Optional[str] = None
) -> Callable[[], None]:
    step = compile_decode_step(model, mode=mode) if compiled else None
    return lambda: generate(model, prompts, new_tokens, temperature=0, decode_step=step)


def litgpt_runner(
    model, prompts: torch.Tensor, new_tokens: int, compiled: bool, mode: Optional[str] = None
) -> Callable[[], None]:
    import litgpt.generate.base as lg

    B, P = prompts.shape
    model.max_seq_length = P + new_tokens  # what litgpt's generate script does: a cache just long enough
    net = torch.compile(model, mode=mode) if compiled else model

    def run():
        model.set_kv_cache(batch_size=B)  # a fresh cache per generation, as modlm's generate makes one
        if B == 1:
            return lg.generate(net, prompts[0], P + new_tokens, temperature=0, include_prompt=False)
        return list(
            lg.batched_generate_fn(
                net, prompts, P + new_tokens, sample_args={"temperature": 0}, include_prompt=False, include_eos=False
            )
        )

    return run


@torch.inference_mode()
def routed_fraction(model: MoDTransformer, prompts: torch.Tensor, new_tokens: int) -> Optional[float]:
    """Fraction of greedy decoding steps the routed blocks processed (mean over blocks and rows)."""
    layers = model.config.routed_layers
    if not layers:
        return None
    state = model.new_state(prompts.size(0))
    token = model.prefill(prompts, state, last_only=True).argmax(-1)
    before = torch.stack([state.caches[i].length for i in layers]).float()
    for _ in range(new_tokens):
        token = model.decode_step(token, state).argmax(-1)
    after = torch.stack([state.caches[i].length for i in layers]).float()
    return float((after - before).mean() / new_tokens)


def decode_flops_ratio(cfg: ModelConfig, fraction: Optional[float], context: int) -> float:
    """Dense per-token decoding FLOPs over this model's, routed blocks at ``fraction``."""
    return decode_flops(cfg, context) / decode_flops(cfg, context, fraction) if fraction is not None else 1.0


def ops_per_step(make: Callable, model, prompts: torch.Tensor) -> float:
    """Top-level aten ops one decoding step dispatches (the difference between generating 40 and 8
    tokens, over 32): per-token overhead in a unit that machine load does not change."""
    from torch.profiler import profile

    counts = []
    for n in (8, 40):
        run = make(model, prompts, n, False)
        with torch.inference_mode():
            run()
            with profile() as prof:
                run()
        counts.append(sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")))
    return (counts[1] - counts[0]) / 32


# --- prompts -----------------------------------------------------------------------------------------
def prompt_batch(vocab_size: int, batch: int, length: int, tokenizer: Optional[str]) -> torch.Tensor:
    """``batch`` prompts of ``length`` tokens: real text (standard-library source, tokenized with the
    model's tokenizer) when one is given, else random ids (fixed seed)."""
    if tokenizer:
        import inspect
        import json as json_module
        import statistics as statistics_module

        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tokenizer)
        text = "".join(inspect.getsource(m) for m in (json_module, statistics_module, argparse))
        ids = torch.tensor(tok.encode(text).ids)
        starts = torch.linspace(0, len(ids) - length - 1, batch).long()
        return torch.stack([ids[s : s + length] for s in starts]).clamp_(max=vocab_size - 1)
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


# --- the run -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="a trained MoD checkpoint (adds the 'modlm MoD trained' rows)")
    ap.add_argument(
        "--tokenizer", default=None, help="tokenizer.json for text prompts (default: data/cache/*/tokenizer.json)"
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="add compiled rows (torch.compile of the decode step)")
    ap.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile's mode for the compiled rows (reduce-overhead: CUDA graphs on a GPU)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--no-litgpt", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--ops", action="store_true", help="also count aten ops per decoding step (batch 1, eager)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = args.tokenizer or next(iter(sorted(glob.glob("data/cache/*/tokenizer.json"))), None)
    device = torch.device(args.device)

    torch.manual_seed(0)
    models = {}
    if args.checkpoint:
        models["modlm MoD trained"] = load_saved(args.checkpoint).model
        shape = models["modlm MoD trained"].config
    else:
        shape = ModelConfig(max_seq_len=256)
    models["modlm MoD untrained"] = MoDTransformer(shape).eval()
    models["modlm dense"] = MoDTransformer(dataclasses.replace(shape, route_every=0)).eval()
    if not args.no_litgpt:
        try:
            models["litgpt dense"] = litgpt_twin(shape)
        except ImportError:
            print(
                "litgpt is not installed (pip install -r bench/requirements.txt): its rows are skipped", file=sys.stderr
            )
    models = {name: model.to(device) for name, model in models.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"shape: d_model {shape.d_model}, {shape.n_layers} blocks, {shape.n_heads} heads, vocab {shape.vocab_size}, "
        f"prompt {args.prompt_tokens}, new tokens {args.new_tokens}, {args.device} ({where}), "
        f"compile mode {args.compile_mode}, prompts: {'text' if tokenizer else 'random ids'}",
        flush=True,
    )

    runs, meta = {}, {}
    for batch in args.batches:
        prompts = prompt_batch(shape.vocab_size, batch, args.prompt_tokens, tokenizer).to(device)
        for name, model in models.items():
            for compiled in [False, True] if args.compile else [False]:
                key = (name, batch, "compiled" if compiled else "eager")
                make = litgpt_runner if name.startswith("litgpt") else modlm_runner
                ops = ops_per_step(make, model, prompts) if args.ops and batch == 1 and not compiled else None
                # made after the counting: litgpt's runner sets the model's length
                run = make(model, prompts, args.new_tokens, compiled, args.compile_mode)
                warmup = timed(run, device)  # and compilation
                meta[key] = {"warmup_s": warmup, "params": params(model), "ops_per_step": ops}
                if not name.startswith("litgpt"):
                    meta[key]["routed"] = routed_fraction(model, prompts, args.new_tokens)
                runs[key] = run
                print(f"ready: {key} (warm-up {meta[key]['warmup_s']:.1f} s)", flush=True)

    times = {key: [] for key in runs}
    for rep in range(args.reps):
        for key, run in runs.items():  # interleaved: every configuration once per repetition
            times[key].append(timed(run, device))
        print(f"repetition {rep + 1}/{args.reps} done", flush=True)

    context = args.prompt_tokens + args.new_tokens // 2
    rows = []
    for key, ts in times.items():
        name, batch, mode = key
        tps = batch * args.new_tokens / statistics.median(ts)
        dense = times.get(("modlm dense", batch, mode))
        lit = times.get(("litgpt dense", batch, "eager"))
        routed = meta[key].get("routed")
        rows.append(
            {
                "model": name,
                "batch": batch,
                "mode": mode,
                "tokens_per_s": tps,
                "ms_per_step": 1e3 * statistics.median(ts) / args.new_tokens,
                "vs_modlm_dense": statistics.median(dense) / statistics.median(ts) if dense else None,
                "vs_litgpt_eager": statistics.median(lit) / statistics.median(ts) if lit else None,
                "routed": routed,
                "flops_ratio": decode_flops_ratio(shape, routed, context) if routed is not None else None,
                "params": meta[key]["params"],
                "warmup_s": meta[key]["warmup_s"],
                "times_s": ts,
                "ops_per_step": meta[key].get("ops_per_step"),
            }
        )
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(
        "\n| model | batch | mode | tokens/s | ms/step | vs modlm dense | vs litgpt eager | routed | FLOPs ratio | "
        "ops/step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['mode']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | "
            f"{fmt(r['vs_modlm_dense'], '.2f')} | {fmt(r['vs_litgpt_eager'], '.2f')} | {fmt(r['routed'], '.3f')} | "
            f"{fmt(r['flops_ratio'], '.2f')} | {fmt(r['ops_per_step'], '.0f')} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "threads": torch.get_num_threads(),
                    "device": where,
                    "torch": torch.__version__,
                    "rows": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
