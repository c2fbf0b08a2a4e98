"""Fine-tuning on chat data from a pretrained dense model: LoRA and full fine-tuning, dense and converted to
Mixture-of-Depths, the same steps, measured on held-out conversations.

    python bench/sft.py corpus      # question/answer pairs from the standard library's docstrings, split
    python bench/sft.py prepare     # the dense Llama folder, copied, given a chat template
    python bench/sft.py tune        # the fits (sequential; a finished one is skipped), peak memory of each
    python bench/sft.py evaluate    # eval.py on the held-out file for every model (and the untuned one)
    python bench/sft.py speed       # training steps and decoding, all models interleaved in one process
    python bench/sft.py report      # the markdown table from the JSON
    python bench/sft.py all

Corpus. For the public functions, classes and methods of the standard-library modules this Python
imports, ``user: "What does `textwrap.dedent` do?"`` (``"What is `abc.ABCMeta`?"`` for a class) and
``assistant:`` the first paragraph of its docstring (20-600 characters): text nobody here wrote. A hash
of the question holds out 10% (``heldout.jsonl``); the rest trains (``train.jsonl``).

Start: ``--folder``, the dense default run exported as a standard ``LlamaForCausalLM`` folder
(``/work/runs/dense_llama``), copied with modlm's default template as its ``chat_template.jinja`` (its
tokenizer, modlm's BPE, has none; ``<|endoftext|>`` ends a turn). The fits (``configs/sft.yaml``, with
``configs/sft_lora.yaml`` for LoRA; ``--steps`` steps, batch 16, one conversation per 256-token window):

* ``dense-lora``: LoRA (rank 8) on the dense model;
* ``mod-lora``: converted to MoD (every other block, capacity 0.125, the capacity falling from 1 over the
  first half) with LoRA, routers and predictors trained in full;
* ``mod-full``: converted, every weight trained;
* ``dense-full``: the dense model, every weight trained (a reference the three are read against).

``evaluate``: held-out assistant-token loss (``eval.py MODEL --data.source heldout.jsonl``: every
held-out conversation, top-k and causal routing), the untuned folder's too. ``tune`` records each fit's
peak resident memory and its trainable parameters. ``speed``: one process, one thread, every model built
as it trains (adapters unmerged, the final capacity) and timed on the same fixed batch, A, B, C, A, B, C
..., medians; then the merged models and the untuned one decode greedily (batch 1, a held-out question's
prompt, 64 new tokens), interleaved the same way. Results in ``--results`` (each JSON names its commit
and the CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from convert import commit, cpu, load, write  # noqa: E402

HELD_OUT = 0.1
SEQ, BATCH = 256, 16
SKIPPED_MODULES = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "venv",
    "test",
    "pydoc_data",
    "xxlimited",
    "xxsubtype",
    "msvcrt",
    "winreg",
    "winsound",
    "msilib",
    "ntpath",
    "nturl2path",
}
"""Modules left out: they open windows or browsers, print when imported, are tests, or are another OS's."""
FITS = {
    "dense-lora": ["--config", "configs/sft.yaml", "--config", "configs/sft_lora.yaml"],
    "mod-lora": ["--config", "configs/sft.yaml", "--config", "configs/sft_lora.yaml", "--model.route_every", "2"],
    "mod-full": ["--config", "configs/sft.yaml", "--model.route_every", "2"],
    "dense-full": ["--config", "configs/sft.yaml"],
}


# --- corpus ------------------------------------------------------------------------------------------
def docstring_pairs() -> list[dict]:
    """One prompt/completion pair per documented public function, class and method of the stdlib."""
    pairs, seen = [], set()
    warnings.simplefilter("ignore")
    for name in sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in SKIPPED_MODULES):
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - another platform's module, a missing optional library
            continue
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            found = [(f"{name}.{attr}", value)]
            if inspect.isclass(value):
                found += [
                    (f"{name}.{attr}.{m}", v)
                    for m, v in sorted(vars(value).items())
                    if not m.startswith("_") and inspect.isfunction(v)
                ]
            elif not (inspect.isfunction(value) or inspect.isbuiltin(value)):
                continue
            for what, obj in found:
                doc = inspect.getdoc(obj)
                answer = doc.split("\n\n")[0].strip() if doc else ""
                if what in seen or not 20 <= len(answer) <= 600:
                    continue
                seen.add(what)
                question = f"What is `{what}`?" if inspect.isclass(obj) else f"What does `{what}` do?"
                pairs.append({"prompt": question, "completion": answer})
    return pairs


def held_out(pair: dict) -> bool:
    digest = hashlib.blake2b(pair["prompt"].encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < HELD_OUT


def corpus(args) -> None:
    if (args.runs / "train.jsonl").exists():
        return
    pairs = docstring_pairs()
    args.runs.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train", False), ("heldout", True)):
        rows = [p for p in pairs if held_out(p) == keep]
        (args.runs / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in rows))
        print(f"{name}: {len(rows)} conversations", flush=True)
    write(
        args.results / "corpus.json",
        {
            "pairs": len(pairs),
            "python": sys.version.split()[0],
            "heldout": sum(map(held_out, pairs)),
            "example": pairs[0],
        },
    )


# --- the folder --------------------------------------------------------------------------------------
def prepare(args) -> None:
    from modlm.data.chat import DEFAULT_CHAT_TEMPLATE

    target = args.runs / "dense-llama-chat"
    if target.exists():
        return
    shutil.copytree(args.folder, target)
    (target / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
    print(f"{target}: {args.folder} with modlm's default chat template", flush=True)


# --- the fits ----------------------------------------------------------------------------------------
def fit_args(args, name: str) -> list[str]:
    return [
        *FITS[name],
        "--model.init_from",
        str(args.runs / "dense-llama-chat"),
        "--data.source",
        str(args.runs / "train.jsonl"),
        "--data.val_source",
        str(args.runs / "heldout.jsonl"),
        "--data.seq_len",
        str(SEQ),
        "--data.batch_size",
        str(BATCH),
        "--trainer.max_steps",
        str(args.steps),
        "--model.capacity_steps",
        str(args.steps // 2),
        "--trainer.val_check_interval",
        str(args.steps // 2),
        "--checkpoint.every_n_train_steps",
        str(args.steps // 2),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(args.runs / name),
    ]


def fit_one(argv: list[str]) -> None:
    """``fit-one OUT ARGS``: train.py fit ARGS in this process, then its peak resident memory into OUT."""
    from modlm.cli.train import main as train_main

    out, args = Path(argv[0]), argv[1:]
    start = time.time()
    code = train_main(["fit", *args])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    out.write_text(json.dumps({"exit": code, "seconds": time.time() - start, "peak_rss_bytes": peak}) + "\n")
    sys.exit(code)


def tune(args) -> None:
    for name in args.only or FITS:
        root = args.runs / name
        if (root / "checkpoints" / f"step={args.steps:07d}.ckpt").exists():
            print(f"{name}: done already", flush=True)
            continue
        root.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "fit-one",
            str(root / "memory.json"),
            *fit_args(args, name),
        ]
        print(f"{name}: {' '.join(cmd)} (load {load()})", flush=True)
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO / "src"),
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        with open(root / "fit.log", "w") as log:
            code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        info = {
            "name": name,
            "command": cmd,
            "exit": code,
            "commit": commit(),
            "cpu": cpu(),
            "load_after": load(),
            **json.loads((root / "memory.json").read_text()),
        }
        write(root / "run.json", info)
        if code:
            raise SystemExit(f"{name} failed (exit {code}); see {root / 'fit.log'}")


def checkpoint(args, name: str) -> Path:
    return args.runs / name / "checkpoints" / "last.ckpt"


def trainable(ckpt: Path) -> int:
    """Parameters the run trained: those its optimizer holds."""
    from modlm.saved import read_checkpoint

    (state,) = read_checkpoint(ckpt, purpose="read")["optimizer_states"]
    return sum(s["exp_avg"].numel() for s in state["state"].values())


# --- evaluation --------------------------------------------------------------------------------------
def evaluate(args) -> None:
    from modlm.cli.eval import main as eval_main

    models = {"untuned": args.runs / "dense-llama-chat", **{n: checkpoint(args, n) for n in FITS}}
    for name, path in models.items():
        out = args.results / "eval" / f"{name}.json"
        if out.exists() or not path.exists():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        assert (
            eval_main(
                [
                    str(path),
                    "--data.source",
                    str(args.runs / "heldout.jsonl"),
                    "--quiet",
                    "--json",
                    str(out),
                    "--decode_tokens",
                    "8",
                    "--prompt_tokens",
                    "8",
                ]
            )
            == 0
        )


# --- speed -------------------------------------------------------------------------------------------
def built(args, name: str):
    """The model of a fit as it trains (adapters unmerged, the final capacity) and its optimizer."""
    from modlm.training.module import MoDLightningModule
    from modlm.training.optim import build_adamw

    routing = {"route_every": 2, "router_weight": "2sigmoid"} if name.startswith("mod") else {"route_every": 0}
    tune_kind = "lora" if name.endswith("lora") else "full"
    module = MoDLightningModule(
        init_from=str(args.runs / "dense-llama-chat"), tune=tune_kind, max_seq_len=SEQ, **routing
    )
    h = module.hparams
    lr = 1e-3 if tune_kind == "lora" else 1e-4
    return module.model.train(), build_adamw(module.model, lr, h.weight_decay, tuple(h.betas), h.eps)


def speed(args) -> None:
    from modlm.analysis.batch import split_batch
    from modlm.data import ModLMDataModule
    from modlm.data.chat import ChatEncoder
    from modlm.model.generate import generate
    from modlm.saved import load_saved

    target = args.results / "speed.json"
    if target.exists():
        return
    torch.set_num_threads(1)
    dm = ModLMDataModule(
        source=str(args.runs / "train.jsonl"),
        val_source=str(args.runs / "heldout.jsonl"),
        tokenizer=str(args.runs / "dense-llama-chat"),
        seq_len=SEQ,
        batch_size=BATCH,
        num_workers=0,
    )
    idx, targets = split_batch(next(iter(dm.train_dataloader())))
    names = list(FITS)
    training = {n: built(args, n) for n in names}

    def step(name: str) -> None:
        model, optimizer = training[name]
        out = model(idx, routing="topk", targets=targets)
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_times = {n: [] for n in names}
    for n in names:
        step(n)  # warm-up
    load_before = load()
    for _ in range(args.reps):
        for n in names:
            start = time.perf_counter()
            step(n)
            step_times[n].append(time.perf_counter() - start)
    training.clear()  # the training models are not needed to decode

    decoders = {
        "untuned": load_saved(str(args.runs / "dense-llama-chat")).model,
        **{n: load_saved(str(checkpoint(args, n))).model for n in names},
    }
    question = json.loads((args.runs / "heldout.jsonl").read_text().splitlines()[0])
    encoder = ChatEncoder(dm.tokenizer.to_str(), dm.chat_template)
    prompt = torch.tensor([encoder.encode([{"role": "user", "content": question["prompt"]}], True)[0]])
    decode_times = {n: [] for n in decoders}
    answers = {}
    for n, model in decoders.items():  # warm-up, and each model's answer (up to its end of turn)
        out = generate(model, prompt, 48, temperature=0, eot_id=encoder.end_of_turn_id)[0, prompt.size(1) :].tolist()
        answers[n] = dm.tokenizer.decode([t for t in out if t != encoder.end_of_turn_id])
    for _ in range(args.reps):
        for n, model in decoders.items():
            start = time.perf_counter()
            generate(model, prompt, args.decode_tokens, temperature=0)
            decode_times[n].append(time.perf_counter() - start)
    write(
        target,
        {
            "commit": commit(),
            "cpu": cpu(),
            "threads": 1,
            "reps": args.reps,
            "load_before": load_before,
            "load_after": load(),
            "batch": list(idx.shape),
            "assistant_targets": int((targets != -100).sum()),
            "step_seconds": {n: statistics.median(t) for n, t in step_times.items()},
            "step_times": step_times,
            "decode": {
                "prompt_tokens": prompt.size(1),
                "new_tokens": args.decode_tokens,
                "tokens_per_s": {n: args.decode_tokens / statistics.median(t) for n, t in decode_times.items()},
                "seconds": decode_times,
            },
            "question": question,
            "answers": answers,
        },
    )


# --- report ------------------------------------------------------------------------------------------
def report(args) -> None:
    evals = {p.stem: json.loads(p.read_text()) for p in (args.results / "eval").glob("*.json")}
    speed_ = json.loads((args.results / "speed.json").read_text()) if (args.results / "speed.json").exists() else {}
    decode = speed_.get("decode", {}).get("tokens_per_s", {})
    lines = [
        "| model | held-out loss, top-k | held-out loss, causal | trainable parameters | peak RSS (training) | "
        "step s (interleaved) | decode tok/s (interleaved) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ["untuned", *FITS]:
        e = evals.get(name)
        if e is None:
            continue
        run = args.runs / name / "run.json"
        info = json.loads(run.read_text()) if run.exists() else {}
        n = trainable(checkpoint(args, name)) if name != "untuned" else 0
        share = f"{n:,} ({100 * n / e['params']:.1f}%)" if n else "-"  # of the model's (routers included)
        rss = f"{info['peak_rss_bytes'] / 2**30:.2f} GiB" if info else "-"
        step = speed_.get("step_seconds", {}).get(name)
        lines.append(
            f"| {name} | {e['topk.loss']:.4f} | {e['causal.loss']:.4f} | {share} | {rss} | "
            f"{f'{step:.3f}' if step else '-'} | {decode.get(name, float('nan')):.1f} |"
        )
    text = "\n".join(lines) + "\n"
    (args.results / "table.md").write_text(text)
    print(text)
    for name, answer in speed_.get("answers", {}).items():
        print(f"{name}: {answer!r}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "fit-one":
        fit_one(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["corpus", "prepare", "tune", "evaluate", "speed", "report", "all"])
    ap.add_argument("--folder", type=Path, default=Path("/work/runs/dense_llama"), help="the dense Llama folder")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "sft", help="where the corpus and the fits go")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "sft")
    ap.add_argument("--steps", type=int, default=200, help="steps of every fit")
    ap.add_argument("--only", nargs="*", default=None, help="tune only these fits")
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions")
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    args.runs, args.results = args.runs.resolve(), args.results.resolve()
    stages = ["corpus", "prepare", "tune", "evaluate", "speed", "report"] if args.stage == "all" else [args.stage]
    for stage in stages:
        globals()[stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
