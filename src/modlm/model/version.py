"""The modlm version, and the format of what it saves.

``__version__`` names the code (``CHANGELOG.md`` says what each one changed). ``FORMAT`` numbers what
checkpoints and export folders hold: the names and meanings of their weights, buffers and keys. It goes
up whenever a saved file of the old format would load wrongly or not at all into the new code, and
every checkpoint and export records both (``written_by``). A file of another format is refused in one
line (``check_format``) rather than carried by branches that guess what an old layout meant: load it
with the modlm that wrote it (docs/pretrained.md, "Checkpoints of earlier versions").

Format 1: modlm before 0.2.0 (no record; the decision thresholds in the model config, a routed block's
router weight on the block). Format 2: modlm 0.2.0 (routers as modules of their own, thresholds as their
buffers).
"""

from __future__ import annotations

from typing import Mapping, Optional

from .errors import UserError

__version__ = "0.2.0"
FORMAT = 2
VERSION_KEY = "modlm"
"""Checkpoint key (and, as ``modlm_version`` / ``modlm_format``, config.json keys) of ``written_by()``."""


class FormatError(UserError):
    """A checkpoint or export folder of another format than this modlm reads."""


def written_by() -> dict:
    """What a checkpoint or export records of the code that wrote it."""
    return {"version": __version__, "format": FORMAT}


def describe(record: Optional[Mapping]) -> str:
    """One line on the code that wrote a model, beside this one's: what eval and generate print."""
    wrote = "not written by modlm" if record is None else f"written by modlm {record.get('version')}"
    return f"modlm {__version__}; the model {wrote}"


def folder_record() -> dict:
    """``written_by()`` as an export folder's ``config.json`` keys (``modlm_version``, ``modlm_format``)."""
    return {f"modlm_{key}": value for key, value in written_by().items()}


def record_of_folder(config: Mapping) -> Optional[dict]:
    """What a folder's ``config.json`` records of the modlm that wrote it (None: nothing, before 0.2.0)."""
    if "modlm_format" not in config:
        return None
    return {key: config.get(f"modlm_{key}") for key in written_by()}


def check_format(record: Optional[Mapping], what: str) -> dict:
    """``record`` (a checkpoint's ``VERSION_KEY`` entry; None for files of modlm before 0.2.0, which wrote
    none) if its format is ``FORMAT``, else ``FormatError`` naming the version that wrote ``what``."""
    record = dict(record or {"version": "before 0.2.0", "format": 1})
    if record.get("format") != FORMAT:
        version = record.get("version", "unknown")
        raise FormatError(
            f"{what} was written by modlm {version} (format {record.get('format')}); this is modlm "
            f"{__version__} (format {FORMAT}): read it with the modlm that wrote it, or train again "
            "(docs/pretrained.md, checkpoints of earlier versions)"
        )
    return record


__all__ = [
    "FORMAT",
    "FormatError",
    "VERSION_KEY",
    "__version__",
    "check_format",
    "describe",
    "folder_record",
    "record_of_folder",
    "written_by",
]
