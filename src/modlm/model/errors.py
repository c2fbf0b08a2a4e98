"""``UserError``: the one exception type that means "fix your input".

Every layer raises it (or a subclass: ``DataError``, ``CheckpointError``) for a problem the user can
fix: a bad config value, missing or empty data, a checkpoint of another shape, a prompt longer than
the model's context. Every command line catches it and prints its first line with exit status 2;
any other exception is a bug and shows its traceback. It lives at the bottom of the package, in the
model folder, because the model raises it too and that folder must stand alone as an export's
remote code.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(ValueError):
    """Input the user has to fix; the message names the value and what is expected."""


def first_line(err: BaseException) -> str:
    """What a command line prints of an error: its message's first line (its type's name if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is the user's to fix (a ``UserError``)."""
    return isinstance(err, UserError)


def run_command(
    body: Callable[[], int],
    user_error: Callable[[BaseException], bool] = is_user_error,
    status: Callable[[BaseException], int] = lambda err: 2,
) -> int:
    """How every modlm command line ends: ``body()``'s exit status, or, for an error the user must fix
    (``user_error(err)``; by default a ``UserError``), its first line on stderr as ``modlm: error: ...``
    and the status ``status(err)`` (by default 2). Any other exception is a bug and keeps its traceback;
    ``MODLM_DEBUG=1`` re-raises every one."""
    try:
        return body()
    except Exception as err:  # noqa: BLE001 - classified below, re-raised unless the user's to fix
        if os.environ.get("MODLM_DEBUG") or not user_error(err):
            raise
        print(f"modlm: error: {first_line(err)}", file=sys.stderr)
        return status(err)
