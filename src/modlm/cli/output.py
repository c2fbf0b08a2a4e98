"""What a command prints: lines about this run, nothing else.

Lightning and its dependencies print a few lines that are not about the run: an advertisement, the
list of accelerators the machine lacks, an upstream deprecation that only Lightning can act on, and
notes that modlm says better in one line of its own (the precision with its reason, the checkpoint
a run resumes from with its step). ``run_output`` silences exactly those, each named by its
message and the module that emits it; every other warning and note is left alone. modlm's own
warnings are printed as one ``modlm: warning:`` line, without the file, line number and source
line of modlm's code that Python's default format would echo after them.
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LIGHTNING_NOTE_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
"""Where Lightning's ``rank_zero_info`` notes are logged from."""

DROPPED_NOTES = (
    r"💡 Tip: ",  # litlogger / litmodels advertisements
    r"GPU available: ",  # which accelerators the machine has (modlm's precision line names the one used)
    r"TPU available: ",
    r"Using (16bit|bfloat16) Automatic Mixed Precision \(AMP\)$",  # modlm's precision line says it, and why
    r"Restoring states from the checkpoint path at ",  # modlm's resume line names the file and its step
    r"Restored all states from the checkpoint at ",
    r"Loaded model weights from the checkpoint at ",
    r"Trainer already configured with model summary callbacks: \[<class 'modlm\.",  # modlm's summary, on purpose
)
"""Lightning notes that are not about the run, or that one ``modlm:`` line replaces."""

SILENCED_WARNINGS = (
    # Lightning's pytree helper uses torch's deprecated LeafSpec; nothing a user can change.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)
"""``(message, category, module)`` of upstream warnings a user can do nothing about."""

_PACKAGE = Path(__file__).resolve().parents[1]  # src/modlm


class _DropNotes(logging.Filter):
    def __init__(self):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in DROPPED_NOTES))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(str(record.getMessage()).strip())


def is_modlm_warning(filename: str) -> bool:
    """Whether a warning is attributed to modlm's own code (it warns about the run, not about a
    line the user wrote)."""
    try:
        return Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        return False


def format_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning) -> str:
    """modlm's warnings as one line (``modlm: warning: ...``); anyone else's in Python's format."""
    if is_modlm_warning(filename):
        text = str(message).strip()
        return f"modlm: warning: {text.removeprefix('modlm: ')}\n"
    return _default(message, category, filename, lineno, line)


@contextmanager
def run_output() -> Iterator[None]:
    """Within the block: Lightning's notes in ``DROPPED_NOTES`` and the warnings in
    ``SILENCED_WARNINGS`` are not printed, and modlm's warnings are one line each. Everything is
    put back when the block ends (filters, format, log filters)."""
    notes = _DropNotes()
    loggers = [logging.getLogger(name) for name in LIGHTNING_NOTE_LOGGERS]
    for logger in loggers:
        logger.addFilter(notes)
    previous_format = warnings.formatwarning
    with warnings.catch_warnings():
        for message, category, module in SILENCED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        warnings.formatwarning = format_warning
        try:
            yield
        finally:
            warnings.formatwarning = previous_format
            for logger in loggers:
                logger.removeFilter(notes)
