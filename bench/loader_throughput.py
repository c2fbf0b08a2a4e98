"""Windows per second of the training dataloader alone (no model), default corpus.

    python bench/loader_throughput.py                    # stdlib, seq_len 256, batch 16
    python bench/loader_throughput.py --num_workers 2 --repeats 5

Each repeat builds a fresh train dataloader (worker start-up included, as at the start
of a fit), skips `--warmup` batches, then times `--batches` batches. Prints every repeat
and the median. The tokenizer is trained (or loaded from data/cache) before timing.
"""
import argparse
import os
import statistics
import time

from modlm.data import ModLMDataModule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="stdlib")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a hub source must not download while timed

    dm = ModLMDataModule(source=args.source, seq_len=args.seq_len, batch_size=args.batch_size,
                         num_workers=args.num_workers)
    print(f"corpus: {dm.corpus.describe()}; vocab {dm.tokenizer_vocab_size}; "
          f"seq_len {args.seq_len}, batch {args.batch_size}, workers {args.num_workers}")
    rates = []
    for r in range(args.repeats):
        it = iter(dm.train_dataloader())
        for _ in range(args.warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        rate = args.batches * args.batch_size / (time.perf_counter() - start)
        rates.append(rate)
        print(f"repeat {r}: {rate:,.0f} windows/s ({rate * args.seq_len:,.0f} tokens/s)")
        del it
    med = statistics.median(rates)
    print(f"median: {med:,.0f} windows/s = {med / args.batch_size:,.1f} batches/s "
          f"({med * args.seq_len:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
