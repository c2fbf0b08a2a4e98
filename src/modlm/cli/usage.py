"""Command-line mistakes as one line: an unknown flag is named with the closest valid ones.

jsonargparse (and argparse under it) answers a mistyped flag with the whole usage, which for
``train.py fit`` is over a hundred lines with the one that matters at the end. Every modlm command
parses with ``exit_on_error`` off instead and turns the parser's error into a ``UsageError``: one
line naming the unknown flag or value, the closest valid names (``difflib``), and the ``--help``
that lists them all. ``--help`` and ``--print_config`` print and exit as before.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from typing import Iterable, Optional

from ..model.errors import UserError


class UsageError(UserError):
    """A command line the parser refused: an unknown flag or subcommand, a value of the wrong type."""


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--flag`` the parser takes (``--model.capacity``, ``--trainer.max_steps`` ...)."""
    return sorted({name for action in parser._actions for name in action.option_strings if name.startswith("--")})


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` valid names most like ``name``: the best match and those nearly as close
    (``--model.capcity`` gives ``--model.capacity``, not every flag that shares ``--model.c``)."""
    scored = sorted(((difflib.SequenceMatcher(None, name, c).ratio(), c) for c in candidates), reverse=True)
    if not scored or scored[0][0] < 0.6:
        return []
    best = scored[0][0]
    return [c for ratio, c in scored[:n] if ratio >= best - 0.05]


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.strip().splitlines() if line.strip())


def explain(message: str, options: list[str], help_hint: str, choices: Optional[dict[str, list[str]]] = None) -> str:
    """The parser's ``message`` as one line: unknown flags with their closest valid names, an
    invalid subcommand with the valid ones, anything else as the parser said it; then ``help_hint``."""
    unknown = re.match(r"unrecognized arguments?: (.*)", message.strip())
    if unknown:
        flags = [token.split("=")[0] for token in unknown.group(1).split() if token.startswith("-")]
        if flags:
            parts = []
            for flag in flags:
                near = closest(flag, options)
                parts.append(f"unknown option {flag}" + (f" (did you mean {' or '.join(near)}?)" if near else ""))
            return "; ".join(parts) + f"; {help_hint}"
        return f"unexpected argument(s) {unknown.group(1)}; {help_hint}"
    invalid = re.search(r"invalid choice: '([^']*)'", message)
    if invalid and choices:
        valid = next(iter(choices.values()))
        near = difflib.get_close_matches(invalid.group(1), valid, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        return f"unknown command {invalid.group(1)!r}: {hint}expected one of {', '.join(valid)}; {help_hint}"
    return f"{_one_line(message)}; {help_hint}"


def parse_args(parser, argv=None):
    """``parser.parse_args(argv)``, a refused command line a ``UserError`` of one line naming the closest
    valid options (the usage is for ``--help``); abbreviated options are refused, never guessed."""
    parser.exit_on_error = False
    parser.allow_abbrev = False
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as err:
        if os.environ.get("MODLM_DEBUG"):
            raise
        raise UserError(explain(str(err), option_names(parser), f"{parser.prog} --help lists every option")) from None
