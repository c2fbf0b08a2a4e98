"""Conversion of a pretrained dense model to Mixture-of-Depths, measured against the dense original and
against MoD trained from scratch with the same total FLOPs.

    python bench/convert.py parity      # logits of transformers' Llama/Mistral/Qwen2 vs their import
    python bench/convert.py prepare     # the dense default run -> a standard LlamaForCausalLM folder, checked
    python bench/convert.py tune        # the fits (sequential; a run already finished is skipped)
    python bench/convert.py evaluate    # eval.py on every model, then interleaved decoding
    python bench/convert.py report      # the markdown table from the JSON
    python bench/convert.py all

Start: modlm's dense default model (``python train.py fit --config configs/dense.yaml``, 400 steps;
``--dense``). ``prepare`` exports it as a standard ``LlamaForCausalLM`` folder with its tokenizer
(``model.to_hf``), imports that folder back and checks that the logits are the original's.
``tune`` converts it (``--model.init_from`` the folder) and fine-tunes on the stdlib corpus as the
default run trains (batch 16 x 256 tokens, the default LR schedule's shape), ``--steps`` steps, the
capacity falling from 1 to the target over the first half (the presets ``configs/convert_full.yaml``
and ``configs/convert_routers.yaml``):

* ``routers-*``: router-only tuning (everything but routers and predictors frozen), capacity 0.125
  every other block, two seeds;
* ``full-*``: full fine-tuning, same, two seeds, and capacities 0.25 and 0.5 (one seed);
* ``attention-c0.25-s1``: full fine-tuning with attention-only routing (``configs/skip_attention.yaml``:
  the routers decide which tokens attend, every token runs the MLP), capacity 0.25, beside ``full-c0.25-s1``;
* ``dense-continued``: the dense model fine-tuned as ``full`` is, with no routing: what the same
  extra steps give a dense model (the control for "the tuning, not the conversion, helps");
* ``scratch-mod``: the default MoD run (capacity 0.125 every other block) trained from scratch for as
  many steps as make its training FLOPs equal the dense run's 400 steps plus ``full-s1``'s tuning.

``evaluate`` runs ``eval.py`` on each (validation loss with top-k and with causal routing, FLOPs per
token, the share causal routing processes; the same 64 validation windows for all: the corpus's,
tokenized with the one tokenizer), plus the converted model before any tuning, then decodes with
the dense original and the MoD models interleaved in one process (A, B, C, A, B, C, ...; batch 1,
one thread, medians). Results: ``bench/results/convert/*.json`` (``--results``), each with the git
commit it came from and the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from modlm import MoDTransformer  # noqa: E402
from modlm.analysis.evaluate import generation_share  # noqa: E402
from modlm.analysis.flops import training_flops  # noqa: E402
from modlm.model.generate import generate  # noqa: E402
from modlm.saved import load_saved, read_checkpoint  # noqa: E402

SEEDS = {"s1": 1, "s2": 2}


def plan(steps: int) -> dict[str, list[str]]:
    """Run name -> the fit's arguments (beyond the folder, the output directory and the seeds)."""
    half = str(steps // 2)
    routers = [
        "--config",
        "configs/convert_routers.yaml",
        "--trainer.max_steps",
        str(steps),
        "--model.capacity_steps",
        half,
    ]
    full = ["--config", "configs/convert_full.yaml", "--trainer.max_steps", str(steps), "--model.capacity_steps", half]
    return {
        "full-s1": full,
        "routers-s1": routers,
        "full-s2": full,
        "routers-s2": routers,
        "dense-continued-s1": [
            "--trainer.max_steps",
            str(steps),
            "--model.route_every",
            "0",
            "--model.lr",
            "0.0005",
            "--model.warmup_steps",
            "20",
        ],
        "full-c0.25-s1": full + ["--model.capacity", "0.25"],
        "full-c0.5-s1": full + ["--model.capacity", "0.5"],
        # attention-only routing (configs/skip_attention.yaml: capacity 0.25), beside full-c0.25-s1
        "attention-c0.25-s1": full + ["--config", "configs/skip_attention.yaml"],
    }


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return out + ("+dirty" if dirty else "")


def cpu() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
        flags = info.get("Flags", "").split()
        return (
            f"{info.get('Model name', platform.processor())} (family {info.get('CPU family')}, model "
            f"{info.get('Model')}), "
            f"{info.get('CPU(s)')} CPUs, {'AVX512-BF16' if 'avx512_bf16' in flags else 'no AVX512-BF16'}"
        )
    except OSError:
        return platform.processor()


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    print(f"wrote {path}", flush=True)


# --- parity ------------------------------------------------------------------------------------------
def parity(args) -> None:
    """Logits of every kind the tests read (transformers' own Llama, Mistral, Qwen2 at a small size with
    random weights) against modlm's import of it: max absolute and relative difference, fp32."""
    import tempfile

    sys.path.insert(0, str(REPO))
    from tests.helpers.pretrained import KINDS, hf_model

    out = {
        "commit": commit(),
        "cpu": cpu(),
        "torch": torch.__version__,
        "inputs": "3 x 100 random token ids",
        "kinds": {},
    }
    for kind in KINDS:
        hf = hf_model(kind)
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            model = MoDTransformer.from_hf(folder)
        idx = torch.randint(0, hf.config.vocab_size, (3, 100), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want, got = hf(idx).logits, model(idx).logits
        gap = float((want - got).abs().max())
        out["kinds"][kind] = {
            "architecture": type(hf).__name__,
            "max_abs": gap,
            "max_rel": gap / float(want.abs().max()),
            "logit_scale": float(want.abs().max()),
        }
        print(kind, out["kinds"][kind], flush=True)
    write(args.results / "parity.json", out)


# --- prepare -----------------------------------------------------------------------------------------
def prepare(args) -> None:
    from modlm.data import ModLMDataModule

    saved = load_saved(args.dense)
    if saved.tokenizer is not None:
        tok = saved.tokenizer
    else:  # an older checkpoint: its data settings name the tokenizer (trained on the corpus, cached)
        settings = {k: v for k, v in saved.data.items() if k in ModLMDataModule.defaults()}
        tok = ModLMDataModule(**settings).tokenizer_file
    folder = args.runs / "dense-llama"
    kind = saved.model.to_hf(folder, tokenizer=tok)
    back = MoDTransformer.from_hf(folder)
    idx = torch.randint(0, saved.model.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = saved.model(idx).logits, back(idx).logits
    config = json.loads((folder / "config.json").read_text())
    result = {
        "commit": commit(),
        "cpu": cpu(),
        "dense": str(args.dense),
        "folder": str(folder),
        "kind": kind,
        "tokenizer": str(tok) if not hasattr(tok, "to_str") else "the checkpoint's own",
        "architectures": config["architectures"],
        "max_abs_logit_diff": float((want - got).abs().max()),
        "logit_scale": float(want.abs().max()),
    }
    try:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            result["transformers_max_abs_logit_diff"] = float((hf(idx).logits - want).abs().max())
        result["transformers_class"] = type(hf).__name__
    except ImportError:
        pass
    write(args.results / "prepare.json", result)


# --- tune --------------------------------------------------------------------------------------------
ORDER = [
    "full-s1",
    "routers-s1",
    "full-s2",
    "scratch-mod",
    "routers-s2",
    "dense-continued-s1",
    "full-c0.25-s1",
    "full-c0.5-s1",
    "attention-c0.25-s1",
]
"""The order the fits run in: the main setting and its from-scratch comparison first."""


def last_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


def finished(root: Path, steps: int) -> bool:
    """Whether a fit of ``steps`` steps has saved its final checkpoint."""
    return (root / "checkpoints" / f"step={steps:07d}.ckpt").exists()


def fit(args, name: str, extra: list[str], seed: int) -> None:
    root = args.runs / name
    steps = int(extra[extra.index("--trainer.max_steps") + 1])
    if finished(root, steps):
        print(f"{name}: done already ({last_checkpoint(root)})", flush=True)
        return
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "fit",
        *extra,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--seed_everything",
        str(seed),
        "--data.seed",
        str(seed),
        "--data.tokenizer",
        str(args.runs / "dense-llama"),
    ]  # the dense run's tokenizer, for every run
    if name != "scratch-mod":
        cmd += ["--model.init_from", str(args.runs / "dense-llama")]
    print(f"{name}: {' '.join(cmd)} (load {load()})", flush=True)
    start = time.time()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "fit.log", "w") as log:
        code = subprocess.run(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT).returncode
    info = {
        "name": name,
        "command": cmd,
        "exit": code,
        "seconds": time.time() - start,
        "commit": commit(),
        "cpu": cpu(),
        "load_after": load(),
    }
    write(root / "run.json", info)
    if code:
        raise SystemExit(f"{name} failed (exit {code}); see {root / 'fit.log'}")


def meter_total(ckpt: Path) -> float:
    state = read_checkpoint(ckpt, purpose="read")["callbacks"]
    return next(v["total"] for k, v in state.items() if k.startswith("FlopsMeter"))


def scratch_steps(args) -> tuple[int, dict]:
    """Steps of the default MoD run whose training FLOPs equal the dense run's plus full-s1's tuning."""
    mod = load_saved(str(args.scratch_like)).model.config if args.scratch_like.exists() else None
    from modlm import ModelConfig

    mod = mod or ModelConfig(vocab_size=8192, max_seq_len=256)
    per_step = 16 * training_flops(mod, 256)
    dense, tune = meter_total(Path(args.dense)), meter_total(last_checkpoint(args.runs / "full-s1"))
    steps = math.ceil((dense + tune) / per_step)
    return steps, {
        "dense_pretraining_flops": dense,
        "full_s1_tuning_flops": tune,
        "mod_flops_per_step": per_step,
        "steps": steps,
        "default_mod_400_steps_flops": 400 * per_step,
    }


def tune(args) -> None:
    runs = plan(args.steps)
    for name in ORDER:
        if args.only and name not in args.only:
            continue
        if name == "scratch-mod":
            steps, budget = scratch_steps(args)
            write(args.results / "budget.json", {**budget, "commit": commit()})
            fit(
                args,
                name,
                [
                    "--trainer.max_steps",
                    str(steps),
                    "--trainer.val_check_interval",
                    str(steps // 4),
                    "--checkpoint.every_n_train_steps",
                    str(steps // 4),
                ],
                1234,
            )
        else:
            fit(args, name, runs[name], SEEDS[name.rsplit("-", 1)[1]])


# --- evaluate ----------------------------------------------------------------------------------------
def models(args) -> dict[str, Path]:
    found = {"dense": Path(args.dense)}
    for name in ORDER:
        if last_checkpoint(args.runs / name).exists():
            found[name] = last_checkpoint(args.runs / name)
    return found


def converted_untuned(args, capacity: float) -> Path:
    """The converted model before any tuning (zero routers, 2*sigmoid weight), as an export folder."""
    from modlm.training.export import write_export

    folder = args.runs / f"converted-untuned-c{capacity:g}"
    if not (folder / "config.json").exists():
        model = MoDTransformer.from_hf(args.runs / "dense-llama", route_every=2, capacity=capacity)
        write_export(model, args.runs / "dense-llama", load_saved(args.dense).data, folder)
    return folder


def evaluate(args) -> None:
    todo = models(args)
    todo["converted-untuned-c0.125"] = converted_untuned(args, 0.125)
    todo["converted-untuned-c1"] = converted_untuned(args, 1.0)
    out = args.results / "eval"
    for name, ckpt in todo.items():
        target = out / f"{name}.json"
        if target.exists():
            continue
        cmd = [
            sys.executable,
            str(REPO / "eval.py"),
            str(ckpt),
            "--json",
            str(target),
            "--quiet",
            "--decode_tokens",
            "8",
            "--prompt_tokens",
            "16",
            "--device",
            "cpu",
        ]
        if ckpt.is_dir() or name == "dense":  # no windows stored: the corpus's, with the one tokenizer
            cmd += ["--data.tokenizer", str(args.runs / "dense-llama"), "--data.source", "stdlib"]
        print(f"eval {name} (load {load()})", flush=True)
        start = time.time()
        done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"eval {name} failed: {done.stderr[-2000:]}")
        data = json.loads(target.read_text())
        data.update({"bench_commit": commit(), "cpu": cpu(), "eval_seconds": time.time() - start, "load_after": load()})
        ckpt_path = Path(ckpt)
        if ckpt_path.is_file():
            data["training_flops"] = meter_total(ckpt_path)
            run_json = ckpt_path.parents[1] / "run.json"
            if run_json.exists():
                data["run"] = json.loads(run_json.read_text())
        target.write_text(json.dumps(data, indent=2, default=float) + "\n")
    windows(args)
    decode(args)


def windows(args) -> None:
    """Whether the validation windows of the checkpoints (stored in them) are the corpus's that the
    dense original and the export folders are evaluated on."""
    from modlm.data import ModLMDataModule

    stored = load_saved(str(first_tuned(args))).validation_windows
    dm = ModLMDataModule(source="stdlib", tokenizer=str(args.runs / "dense-llama"), num_workers=0)
    write(
        args.results / "windows.json",
        {
            "same_windows": bool(torch.equal(stored, dm.validation_windows)),
            "windows": list(stored.shape),
            "commit": commit(),
        },
    )


def first_tuned(args) -> Path:
    """The first fit of ``ORDER`` that has run (its checkpoint carries the validation windows)."""
    found = models(args)
    return next(found[name] for name in ORDER if name in found)


def decode(args) -> None:
    target = args.results / "decode.json"
    if target.exists():
        return
    torch.set_num_threads(1)
    names = [
        n
        for n in (
            "dense",
            "full-s1",
            "routers-s1",
            "scratch-mod",
            "full-c0.25-s1",
            "full-c0.5-s1",
            "attention-c0.25-s1",
        )
        if n in models(args)
    ]
    loaded = {n: load_saved(str(models(args)[n])).model.eval() for n in names}
    windows = load_saved(str(first_tuned(args))).validation_windows
    prompt = windows[:1, :32]
    new = args.decode_tokens
    times = {n: [] for n in names}
    for n in names:  # warm-up
        generate(loaded[n], prompt, 4, temperature=0)
    load_before = load()
    for _ in range(args.reps):
        for n in names:
            start = time.perf_counter()
            generate(loaded[n], prompt, new, temperature=0)
            times[n].append(time.perf_counter() - start)
    dense = statistics.median(times["dense"])
    result = {
        "commit": commit(),
        "cpu": cpu(),
        "threads": 1,
        "batch": 1,
        "prompt_tokens": 32,
        "new_tokens": new,
        "reps": args.reps,
        "load_before": load_before,
        "load_after": load(),
        "models": {},
    }
    for n in names:
        t = statistics.median(times[n])
        result["models"][n] = {
            "tokens_per_s": new / t,
            "vs_dense": dense / t,
            "seconds": times[n],
            "routed_share": generation_share(loaded[n], prompt, new, temperature=0).get("capacity_used"),
        }
    write(target, result)


# --- report ------------------------------------------------------------------------------------------
ROWS = [
    "dense",
    "dense-continued-s1",
    "converted-untuned-c1",
    "converted-untuned-c0.125",
    "routers-s1",
    "routers-s2",
    "full-s1",
    "full-s2",
    "full-c0.25-s1",
    "full-c0.5-s1",
    "attention-c0.25-s1",
    "scratch-mod",
]


def report(args) -> None:
    evals = {p.stem: json.loads(p.read_text()) for p in (args.results / "eval").glob("*.json")}
    dec = (
        json.loads((args.results / "decode.json").read_text())
        if (args.results / "decode.json").exists()
        else {"models": {}}
    )
    dense = evals.get("dense", {})
    lines = [
        "| model | training FLOPs | val loss top-k | val loss causal | causal share processed | forward FLOPs/token "
        "(causal) | vs dense | decode tok/s | vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ROWS:
        e = evals.get(name)
        if e is None:
            continue
        layers = e.get("routed_layers") or []
        share = statistics.mean(e[f"causal.capacity_used.layer_{i}"] for i in layers) if layers else 1.0
        flops = e.get("training_flops")
        if name not in ("dense", "scratch-mod") and flops is not None:
            flops += dense.get("training_flops", 0.0)  # the pretraining is part of what it cost
        d = dec["models"].get(name, {})
        lines.append(
            f"| {name} | {flops / 1e12:.1f}T | {e['topk.loss']:.4f} | {e['causal.loss']:.4f} | {share:.3f} | "
            f"{e['flops_per_token'] / 1e6:.2f}M | {e['flops_per_token'] / dense['flops_per_token']:.3f} | "
            f"{d.get('tokens_per_s', float('nan')):.1f} | {d.get('vs_dense', float('nan')):.2f} |"
            if flops is not None
            else f"| {name} | - | {e['topk.loss']:.4f} | {e['causal.loss']:.4f} | {share:.3f} | "
            f"{e['flops_per_token'] / 1e6:.2f}M | "
            f"{e['flops_per_token'] / dense['flops_per_token']:.3f} | - | - |"
        )
    for mode in ("routers", "full"):
        pair = [evals[f"{mode}-{s}"] for s in SEEDS if f"{mode}-{s}" in evals]
        if len(pair) == 2:
            for key in ("topk.loss", "causal.loss"):
                values = [p[key] for p in pair]
                lines.append(
                    f"\n{mode}, capacity 0.125, {key}: mean {statistics.mean(values):.4f}, "
                    f"seeds {values[0]:.4f} / {values[1]:.4f} (spread {abs(values[0] - values[1]):.4f})"
                )
    text = "\n".join(lines) + "\n"
    (args.results / "table.md").write_text(text)
    print(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["parity", "prepare", "tune", "evaluate", "report", "all"])
    ap.add_argument(
        "--dense", default="/work/runs/dense/checkpoints/last.ckpt", help="the dense default run's checkpoint"
    )
    ap.add_argument(
        "--scratch-like",
        type=Path,
        default=Path("/work/runs/default/checkpoints/last.ckpt"),
        help="the default MoD run (its shape is the from-scratch run's)",
    )
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "convert", help="where the fits go")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "convert")
    ap.add_argument("--steps", type=int, default=200, help="tuning steps of every fit")
    ap.add_argument("--only", nargs="*", default=None, help="tune only these runs")
    ap.add_argument("--reps", type=int, default=7, help="interleaved decoding repetitions")
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    args.runs, args.results = args.runs.resolve(), args.results.resolve()
    stages = ["prepare", "tune", "evaluate", "report"] if args.stage == "all" else [args.stage]
    for stage in stages:
        globals()[stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
