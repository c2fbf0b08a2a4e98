"""What the data layer tells the user while it works: one-line notes on rank 0 only (every rank
would print the same), to stderr, before any process group exists (launchers set RANK)."""

import os
import sys


def is_rank_zero() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def note(message: str) -> None:
    if is_rank_zero():
        print(f"modlm: {message}", file=sys.stderr, flush=True)


def show_bars() -> bool:
    """Progress bars on rank 0 of an interactive terminal (not in logs or tests)."""
    return is_rank_zero() and sys.stderr.isatty()
