"""``python -m modlm.prepare SOURCE OUT``: tokenize a corpus once into token shards to train from.

    python -m modlm.prepare ~/corpus/ data/corpus-tokens --num_proc 16
    python train.py fit --data.source data/corpus-tokens          # no tokenization while training

SOURCE is anything ``--data.source`` accepts (files, folder, glob, ``stdlib``, ``hub:NAME``); the
tokenizer is the one a run on SOURCE with the same settings would train or load (cached), and is
stored in OUT. Every default is the data module's. The shard format is ``modlm.data.shards``.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys


def _defaults() -> dict:
    from ..data import ModLMDataModule

    return {k: p.default for k, p in inspect.signature(ModLMDataModule.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def build_parser() -> argparse.ArgumentParser:
    d = _defaults()
    p = argparse.ArgumentParser(prog="python -m modlm.prepare", description=__doc__.splitlines()[0])
    p.add_argument("source", help="corpus: a file, folder or glob of text/jsonl/json/parquet, 'stdlib' or 'hub:NAME'")
    p.add_argument("out", help="the prepared folder to write (must not exist)")
    p.add_argument("--vocab_size", type=int, default=d["vocab_size"])
    p.add_argument("--tokenizer_path", default=d["tokenizer_path"], help="use this tokenizer.json instead of training one")
    p.add_argument("--text_field", default=d["text_field"])
    p.add_argument("--val_fraction", type=float, default=d["val_fraction"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--tokenizer_train_chars", type=int, default=d["tokenizer_train_chars"])
    p.add_argument("--cache_dir", default=d["cache_dir"])
    p.add_argument("--num_proc", type=int, default=os.cpu_count() or 1, help="tokenizing processes (default: all cores)")
    p.add_argument("--shard_tokens", type=int, default=2**27, help="tokens per shard file (default 2^27)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..data.errors import DataError
    from ..data.shard_writer import prepare_corpus

    try:
        corpus = prepare_corpus(
            args.source, args.out, vocab_size=args.vocab_size, tokenizer_path=args.tokenizer_path,
            text_field=args.text_field, val_fraction=args.val_fraction, seed=args.seed,
            tokenizer_train_chars=args.tokenizer_train_chars, cache_dir=args.cache_dir,
            num_proc=args.num_proc, shard_tokens=args.shard_tokens, progress=not args.no_progress,
        )
    except DataError as err:
        if os.environ.get("MODLM_DEBUG"):
            raise
        print(f"modlm: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"modlm: prepared {corpus.describe()}; train with --data.source {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
