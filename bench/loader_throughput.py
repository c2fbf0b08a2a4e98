"""Tokens per second of the training dataloader alone (no model): raw text vs prepared shards.

    python bench/loader_throughput.py                                  # stdlib, raw text, 1 worker
    python bench/loader_throughput.py --source data/stdlib-tokens      # a prepared folder (python -m modlm.prepare)
    python bench/loader_throughput.py --seq_len 1024 --batch_size 32 --num_workers 4   # configs/gpu.yaml's loader

Each repeat builds a fresh train dataloader (worker start-up included, as at the start of a fit),
skips `--warmup` batches, then times `--batches` batches. Prints every repeat, the median, and the
median per worker (the rate one worker sustains; workers scale it until the cores run out). The
tokenizer is trained (or loaded from data/cache) before timing.
"""

import argparse
import os
import statistics
import time

from modlm.data import ModLMDataModule
from modlm.data.corpus import PreparedCorpus

DEFAULTS = ModLMDataModule.defaults()  # the data settings' defaults are the data module's

GPU_PRESET_TOKENS_PER_S = 505_000  # configs/gpu.yaml trained on one H200 (bench/README.md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=DEFAULTS["source"])
    p.add_argument("--seq_len", type=int, default=DEFAULTS["seq_len"])
    p.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--vocab_size", type=int, default=DEFAULTS["vocab_size"])
    p.add_argument("--num_workers", type=int, default=DEFAULTS["num_workers"])
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a hub source must not download while timed

    dm = ModLMDataModule(
        source=args.source,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        vocab_size=args.vocab_size,
        num_workers=args.num_workers,
    )
    kind = "prepared shards" if isinstance(dm.corpus, PreparedCorpus) else "raw text"
    print(
        f"corpus: {dm.corpus.describe()} [{kind}]; vocab {dm.tokenizer_vocab_size}; "
        f"seq_len {args.seq_len}, batch {args.batch_size}, workers {args.num_workers}"
    )
    rates = []
    for r in range(args.repeats):
        it = iter(dm.train_dataloader())
        for _ in range(args.warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        rate = args.batches * args.batch_size * args.seq_len / (time.perf_counter() - start)
        rates.append(rate)
        print(f"repeat {r}: {rate:,.0f} tokens/s")
        del it
    med = statistics.median(rates)
    per_worker = med / max(1, args.num_workers)
    print(
        f"median: {med:,.0f} tokens/s ({per_worker:,.0f} per worker; "
        f"{med / GPU_PRESET_TOKENS_PER_S:.1f}x the {GPU_PRESET_TOKENS_PER_S:,} tokens/s configs/gpu.yaml trains at "
        "on one H200)"
    )


if __name__ == "__main__":
    main()
