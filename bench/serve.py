"""Serving under load: ``modlm-serve`` for MoD and its dense twin, N concurrent ``openai`` clients each.

    python bench/serve.py --model mod=runs/default/checkpoints/last.ckpt \\
        --model dense=runs/dense/checkpoints/last.ckpt --clients 1 4 8 16 --reps 3 --json bench/results/serve_cpu.json

One server per model (``python -m modlm.serve``, each its own process on 127.0.0.1, started once and
idle while the others are loaded), then every load in turn, model after model (A, B, C, A, B, C,
...; the models' order rotates each repetition), so the machine's noise hits them alike. A load is
``--clients`` threads, each sending ``--requests`` streamed completions one after another (greedy,
``--new-tokens`` each, prompts cut from the validation windows the checkpoint carries: ``short`` and
``long`` tokens long, a different window per request). Per load: tokens/s (every completion token
the clients received over the load's wall time) and time to first token (from sending a request to
its first text, p50 and p95 over the load's requests) and the gap between two pieces of a stream
(p50, p95: a prompt's prefill delays the running streams by its chunk); per figure the median over
repetitions.

KV-cache memory per sequence is read from the model's own caches after one greedy generation of a
short and a long prompt alone: the entries the caches hold (a routed block keeps only the tokens it
processed) and the slots a server allocates per row (``max_seq_len`` per block, whatever it holds).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai
import torch

from modlm.data.tokenizer import fingerprint
from modlm.model.kv_cache import KVCache, StackCache
from modlm.saved import load_saved

REPO = Path(__file__).resolve().parents[1]


# --- servers -----------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m modlm.serve PATH`` on a free port of 127.0.0.1, up once ``/health`` answers."""

    def __init__(self, name: str, path: str, args: list[str], log: Path):
        self.name, self.port = name, free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modlm.serve",
                path,
                "--port",
                str(self.port),
                "--model_name",
                name,
                "--log_level",
                "warning",
                *args,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(log, "w"),
        )
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=600
        )
        end = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the {name} server exited ({self.proc.returncode}): see {log}")
            try:
                self.client.models.list()
                return
            except openai.APIConnectionError:
                if time.monotonic() > end:
                    raise SystemExit(f"the {name} server did not come up: see {log}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


# --- load --------------------------------------------------------------------------------------------
def one_request(client, model: str, prompt: list[int], new_tokens: int) -> dict:
    """A streamed greedy completion: when it was sent, when its first text came, when it ended, its tokens."""
    start = time.perf_counter()
    arrivals, tokens, text = [], 0, ""
    for chunk in client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
            text += chunk.choices[0].text
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {
        "start": start,
        "ttft": (arrivals[0] if arrivals else end) - start,
        "end": end,
        "tokens": tokens,
        "text": text,
        "gaps": gaps,
    }


def load(server: Server, prompts: list[list[int]], clients: int, requests: int, new_tokens: int) -> dict:
    """``clients`` threads, each sending ``requests`` completions in a row."""

    def client_loop(c):
        return [
            (i, one_request(server.client, server.name, prompts[i], new_tokens))
            for i in ((c * requests + r) % len(prompts) for r in range(requests))
        ]

    with cf.ThreadPoolExecutor(clients) as pool:
        done = [r for rs in pool.map(client_loop, range(clients)) for r in rs]
    wall = max(r["end"] for _, r in done) - min(r["start"] for _, r in done)
    ttft = sorted(r["ttft"] for _, r in done)
    gaps = sorted(g for _, r in done for g in r["gaps"]) or [0.0]
    return {
        "tokens_per_s": sum(r["tokens"] for _, r in done) / wall,
        "tokens": sum(r["tokens"] for _, r in done),
        "wall_s": wall,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "gap_p50_s": percentile(gaps, 50),
        "gap_p95_s": percentile(gaps, 95),
        "texts": {i: r["text"] for i, r in done},
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


# --- KV-cache memory ---------------------------------------------------------------------------------
def caches_of(state) -> list[KVCache]:
    found = []
    for entry in state.caches:
        for cache in entry if isinstance(entry, list) else [entry]:
            found += [b for b in cache.blocks if b is not None] if isinstance(cache, StackCache) else [cache]
    return found


@torch.inference_mode()
def kv_memory(model, prompt: list[int], new_tokens: int) -> dict:
    """Bytes of keys and values one sequence's caches hold after a greedy generation, and the bytes a
    server allocates per row."""
    state = model.new_state(1)
    model.generate(prompt, new_tokens, temperature=0, state=state)
    caches = caches_of(state)
    per_entry = [2 * c.k.size(1) * c.k.size(3) * c.k.element_size() for c in caches]  # keys and values
    held = sum(int(c.length[0]) * b for c, b in zip(caches, per_entry))
    allocated = sum((c.max_len + 1) * b for c, b in zip(caches, per_entry))
    dense = sum(int(state.seen[0]) * b for b in per_entry)  # every block holding every token
    return {"held_bytes": held, "allocated_bytes": allocated, "dense_bytes": dense, "tokens": int(state.seen[0])}


# --- the run -----------------------------------------------------------------------------------------
def prompts_of(saved, length: int, count: int) -> list[list[int]]:
    windows = saved.validation_windows
    if windows is None or windows.size(1) < length:
        raise SystemExit(f"{saved.path} carries no validation windows of {length} tokens to cut prompts from")
    return [windows[i % len(windows), :length].tolist() for i in range(count)]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        return f"{name}, {os.cpu_count()} CPUs"
    except Exception:  # noqa: BLE001 - a machine without lscpu
        return platform.processor() or "unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="a model to serve (repeat)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=3, help="completions each client sends in a row")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--short", type=int, default=16, help="prompt tokens of the short prompts")
    p.add_argument("--long", type=int, default=192, help="prompt tokens of the long prompts")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--prefill-chunk", type=int, help="each server's --prefill_chunk (default: the server's)")
    p.add_argument("--json", type=Path)
    p.add_argument("--report", type=Path, help="print the tables of an earlier --json and exit")
    args = p.parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        names = list(dict.fromkeys(r["model"] for r in saved["runs"]))
        print(summary(saved["runs"], names, saved["memory"]))
        print(saved.get("same_texts", ""))
        return
    models = dict(spec.split("=", 1) for spec in args.model)
    logs = (args.json.parent if args.json else Path(".")) / "serve_logs"
    logs.mkdir(parents=True, exist_ok=True)

    prompts, memory = {}, {}
    count = max(args.clients) * args.requests
    shared = {}  # tokenizer fingerprint -> prompts: a folder without validation windows (a transformers
    for name, path in models.items():  # folder) is prompted with those of a model with its tokenizer
        saved = load_saved(path)
        key = fingerprint(saved.tokenizer)
        if saved.validation_windows is None and key in shared:
            prompts[name] = shared[key]
        else:
            lengths = (("short", args.short), ("long", args.long))
            prompts[name] = shared.setdefault(key, {kind: prompts_of(saved, n, count) for kind, n in lengths})
        memory[name] = {kind: kv_memory(saved.model, prompts[name][kind][0], args.new_tokens) for kind in prompts[name]}
        del saved

    info = {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "load_average_start": os.getloadavg(),
        "commit": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    server_args = ["--threads", str(args.threads), "--max_batch", str(args.max_batch)]
    if args.prefill_chunk is not None:
        server_args += ["--prefill_chunk", str(args.prefill_chunk)]
    servers = {name: Server(name, path, server_args, logs / f"{name}.log") for name, path in models.items()}
    runs = []
    try:
        for server in servers.values():  # warm up: first requests pay one-time costs
            load(server, prompts[server.name]["short"], 2, 1, 8)
        names = list(models)
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for clients in args.clients:
                for kind in ("short", "long"):
                    for name in order:
                        result = load(servers[name], prompts[name][kind], clients, args.requests, args.new_tokens)
                        runs.append({"model": name, "clients": clients, "prompt": kind, "rep": rep, **result})
                        print(
                            f"rep {rep} {name:>10} {kind:>5} x{clients:<2} {result['tokens_per_s']:8.1f} tok/s "
                            f"ttft p50 {result['ttft_p50_s'] * 1e3:7.1f} ms p95 {result['ttft_p95_s'] * 1e3:7.1f} ms",
                            flush=True,
                        )
    finally:
        for server in servers.values():
            server.stop()
    info["load_average_end"] = os.getloadavg()
    table = summary(runs, names, memory)
    print(table)
    print(same_texts(runs))
    if args.json:
        kept = [{k: v for k, v in r.items() if k != "texts"} for r in runs]  # the texts were for same_texts
        args.json.write_text(
            json.dumps({"info": info, "memory": memory, "runs": kept, "same_texts": same_texts(runs)}, indent=1)
        )


def same_texts(runs: list[dict]) -> str:
    """Whether every greedy completion of a prompt was the same text in every load it was part of
    (1 client or 16, any repetition): the answer does not depend on the batch."""
    seen, loads, differ = {}, {}, set()
    for r in runs:
        for i, text in r["texts"].items():
            key = (r["model"], r["prompt"], i)
            loads.setdefault(key, set()).add(r["clients"])
            if seen.setdefault(key, text) != text:
                differ.add(key)
    across = sum(len(c) > 1 for c in loads.values())
    return (
        f"greedy texts: {len(seen)} (model, prompt) pairs, {across} of them served under different client "
        f"counts; {len(differ)} differed between loads" + (f": {sorted(differ)}" if differ else "")
    )


def summary(runs: list[dict], names: list[str], memory: dict) -> str:
    """Markdown: medians per (model, prompt, clients); the ratios (to the same model's 1-client load,
    to the first model named ``dense*``) are medians of ratios taken within each repetition, where the
    loads compared ran close together."""

    def value(model, prompt, clients, rep, key="tokens_per_s"):
        return next(
            r[key] for r in runs if (r["model"], r["prompt"], r["clients"], r["rep"]) == (model, prompt, clients, rep)
        )

    def median(model, prompt, clients, key):
        return statistics.median(value(model, prompt, clients, rep, key) for rep in reps)

    def ratio(a, b):
        return statistics.median(value(*a, rep) / value(*b, rep) for rep in reps)

    reps = sorted({r["rep"] for r in runs})
    dense = next((n for n in names if n.startswith("dense")), None)
    lines = [
        "| model | prompt | clients | tokens/s | x 1 client | vs dense | TTFT p50 ms | TTFT p95 ms | gap p50 ms "
        "| gap p95 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    clients = sorted({r["clients"] for r in runs})
    for prompt in ("short", "long"):
        for c in clients:
            for name in names:
                scale = ratio((name, prompt, c), (name, prompt, clients[0]))
                vs = f"{ratio((name, prompt, c), (dense, prompt, c)):.2f}" if dense and name != dense else "-"
                ms = [
                    f"{median(name, prompt, c, key) * 1e3:.0f}"
                    for key in ("ttft_p50_s", "ttft_p95_s", "gap_p50_s", "gap_p95_s")
                ]
                lines.append(
                    f"| {name} | {prompt} | {c} | {median(name, prompt, c, 'tokens_per_s'):.1f} | "
                    f"{scale:.2f} | {vs} | {' | '.join(ms)} |"
                )
    lines += [
        "",
        "| model | prompt | tokens | KV held (KiB) | vs all blocks holding all | allocated per row (KiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        for prompt, m in memory[name].items():
            lines.append(
                f"| {name} | {prompt} | {m['tokens']} | {m['held_bytes'] / 1024:.0f} | "
                f"{m['held_bytes'] / m['dense_bytes']:.2f} | {m['allocated_bytes'] / 1024:.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
