"""The evaluation command line: ``python eval.py CKPT [--json OUT] [--compare CKPT2] ...``.

    python eval.py runs/default/checkpoints/last.ckpt                     # table on stdout
    python eval.py CKPT --json results.json                              # every number as JSON
    python eval.py CKPT --compare runs/dense/checkpoints/last.ckpt       # side by side + PNG plot
    python eval.py CKPT --generate "def fibonacci(n):"                   # print a continuation
    python eval.py CKPT --export exported/                               # safetensors + config.json

CKPT is a Lightning checkpoint written by ``train.py`` (read with ``torch.load(weights_only=True)``:
no pickled code runs) or a folder written by ``--export``. The data is the validation split of
the corpus the model was trained on (``--data.source`` to use another). JSON keys are flat and
dotted: ``topk.loss``, ``topk.ppl``, ``topk.bpb``, ``causal.loss``, ``causal.ppl``,
``causal.capacity_used``, ``causal.causal_acc.layer_3``, ``decode_tokens_per_s``, ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .checkpoint import export, load_model
from .evaluate import decode_speed, evaluate_routing, flops_per_token, token_byte_lengths
from .model import MoDTransformer
from .report import plot, table


class EvalError(ValueError):
    """A problem with the user's input: printed as one line, exit status 2."""


def build_data(data: dict, args, model: MoDTransformer):
    """The data module of the model's own corpus and tokenizer, unless the flags name others."""
    from .data import ModLMDataModule

    settings = {**data, "seq_len": data.get("seq_len", model.config.max_seq_len), "num_workers": 0}
    for key in ("source", "tokenizer_path"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.batch_size:
        settings["batch_size"] = args.batch_size
    dm = ModLMDataModule(**settings)
    if dm.tokenizer_vocab_size != model.config.vocab_size:
        raise EvalError(
            f"tokenizer does not match the model: {dm.tokenizer_vocab_size} tokens vs the model's "
            f"vocab_size={model.config.vocab_size} (pass the tokenizer it was trained with: --tokenizer_path)"
        )
    return dm


def evaluate_checkpoint(path: str, args) -> tuple[dict, MoDTransformer, object]:
    """Every number of one checkpoint (flat dotted keys), the model and its data module."""
    from tqdm import tqdm

    model, data = load_model(path, args.device)
    dm = build_data(data, args, model)
    dm.setup("validate")
    batches = list(dm.val_dataloader())[: args.max_batches or None]
    if not batches:
        raise EvalError(f"no validation windows for source {dm.source!r} (val_fraction or val_windows is 0?)")
    byte_lengths = token_byte_lengths(dm.tokenizer, model.config.vocab_size)
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16")
    result = {"checkpoint": str(path), "params": model.num_params(), "routed_layers": model.config.routed_layers}
    modes = ["topk", "causal"] if model.config.routed_layers else ["topk"]
    with autocast, tqdm(total=len(batches) * len(modes), desc=f"evaluating {Path(path).name}", disable=args.quiet) as bar:
        for mode in modes:
            figures = evaluate_routing(model, batches, mode, byte_lengths, progress=bar)
            result.update({f"{mode}.{k}": v for k, v in figures.items()})
    if "causal" not in modes:  # a dense model routes nothing: both modes are the same computation
        result.update({k.replace("topk.", "causal.", 1): v for k, v in list(result.items()) if k.startswith("topk.")})
    seq_len = batches[0].shape[1] - 1
    used = [result[f"causal.capacity_used.layer_{i}"] for i in model.config.routed_layers] or None
    result["flops_per_token"] = flops_per_token(model, seq_len, used)
    result["flops_per_token_topk"] = flops_per_token(model, seq_len)
    prompt_len = min(args.prompt_tokens, model.config.max_seq_len // 2)  # leave room to generate
    prompt = batches[0][:1, :prompt_len].to(args.device)
    new_tokens = min(args.decode_tokens, model.config.max_seq_len - prompt_len)
    with autocast:
        result["decode_tokens_per_s"] = decode_speed(model, prompt, new_tokens)
    return result, model, dm


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint (.ckpt) or export folder")
    p.add_argument("--json", help="write every number to this JSON file")
    p.add_argument("--compare", help="a second checkpoint (e.g. the dense twin) to show side by side")
    p.add_argument("--plot", help="PNG of the comparison (default: compare.png beside --json, or ./compare.png)")
    p.add_argument("--generate", metavar="PROMPT", help="print a continuation of PROMPT")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--export", metavar="DIR", help="write model.safetensors, config.json, tokenizer.json, data.json")
    p.add_argument("--data.source", dest="source", help="evaluate on this corpus instead of the training one")
    p.add_argument("--tokenizer_path", "--data.tokenizer_path", dest="tokenizer_path")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--max-batches", type=int, default=0, help="evaluate on at most this many validation batches")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for the decode-speed test")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated for the decode-speed test")
    p.add_argument("--precision", choices=["32", "bf16"], default="32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    """Run the command; return the exit status (0 ok, 2 user error). ``MODLM_DEBUG=1`` re-raises."""
    args = parser().parse_args(argv)
    torch.manual_seed(args.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return run(args)
    except ValueError as err:  # EvalError, CheckpointError, DataError, ModelConfig's errors: the user's to fix
        if os.environ.get("MODLM_DEBUG"):
            raise
        print(f"eval.py: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2


def run(args) -> int:
    result, model, dm = evaluate_checkpoint(args.ckpt, args)
    results = [result]
    if args.compare:
        results.append(evaluate_checkpoint(args.compare, args)[0])
    print(table(results))
    if args.compare:
        out = Path(args.plot) if args.plot else (Path(args.json).with_name("compare.png") if args.json else Path("compare.png"))
        plot(results, out)
        print(f"plot: {out}")
    if args.json:
        payload = result if not args.compare else {**result, "compare": results[1]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2, default=float) + "\n")
        print(f"json: {args.json}")
    if args.generate is not None:
        ids = dm.tokenizer.encode(args.generate).ids
        if not ids:
            raise EvalError("--generate needs a non-empty prompt")
        out = model.generate([ids], max_new_tokens=min(args.max_new_tokens, model.config.max_seq_len - len(ids)),
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eot_id=dm.eot_id)[0]
        print(dm.tokenizer.decode(out.tolist()))
    if args.export:
        export(model, dm.tokenizer, dict(dm.hparams), Path(args.export))
        print(f"exported: {args.export}")
    return 0
