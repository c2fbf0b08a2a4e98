"""Reading saved files: a checkpoint file (read once per version of the file, never unpickling code), an
FSDP2 sharded checkpoint folder (consolidated with torch's distributed-checkpoint tools), and what is
wrong with one that does not read."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..model.errors import UserError, first_line


class CheckpointError(UserError):
    """A file or folder that is not a readable modlm model; the message names it."""


def is_checkpoint(path) -> bool:
    """Whether ``path`` is a checkpoint file or a sharded checkpoint folder (not, say, a tokenizer)."""
    p = Path(path)
    return (p.is_file() and p.suffix == ".ckpt") or (p.is_dir() and (p / ".metadata").is_file())


def read_sharded_meta(folder: Path) -> dict:
    """What a sharded checkpoint folder keeps beside its shards (hyperparameters, loops, callbacks,
    what travels with the model), without reading the shards."""
    meta = folder / "meta.pt"
    if not (folder / ".metadata").is_file() or not meta.is_file():
        raise CheckpointError(f"{folder} is not a sharded checkpoint folder (expected .metadata and meta.pt)")
    return torch.load(meta, map_location="cpu", weights_only=True)


def read_sharded(folder: Path) -> dict:
    """An FSDP2 sharded checkpoint folder (``ModelParallelStrategy``'s) as one checkpoint dict: its
    shards consolidated by torch's distributed-checkpoint tools, its other state from ``meta.pt``."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta = read_sharded_meta(folder)
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole.pt"
        dcp_to_torch_save(folder, whole)
        state = torch.load(whole, map_location="cpu", weights_only=True)
    return {**meta, "state_dict": state["state_dict"]}


_READ: dict[tuple, object] = {}  # (path, mtime, size) -> what reading it gave: the contents, or the damage


def _read(path: Path):
    """The contents of a checkpoint file, or a string saying what is wrong with it; each version of
    a file (path, modification time, size) is opened once per process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _READ:
        try:
            # mmap: tensors are not read until used; weights_only: never unpickles code
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - corrupt, truncated, or objects that are not plain data
            reason = first_line(err)
            if any(m in reason.lower() for m in ("weights only", "weights_only", "unsupported global")):
                ckpt = "it holds pickled objects other than tensors and plain values (modlm never unpickles code)"
            else:
                ckpt = f"not a readable PyTorch checkpoint (truncated or corrupt: {reason[:120]})"
        else:
            if not isinstance(ckpt, dict) or "state_dict" not in ckpt and "loops" not in ckpt:
                ckpt = "not a Lightning checkpoint"
        _READ.clear()  # one file at a time is all a command needs: keep no more in memory
        _READ[key] = ckpt
    return _READ[key]


def checkpoint_damage(path) -> Optional[str]:
    """None if ``path`` reads as a checkpoint, else what is wrong with it (a few words). A sharded
    folder must hold the ``.metadata`` index, which torch's distributed checkpoint writes last."""
    p = Path(path)
    if p.is_dir():
        return None if (p / ".metadata").is_file() else "a sharded checkpoint folder without its .metadata index"
    found = _read(p)
    return found if isinstance(found, str) else None


def read_checkpoint(path, purpose: str = "resume from") -> dict:
    """A checkpoint file's contents; a ``CheckpointError`` naming the file and what is wrong
    otherwise (``purpose`` says what the command was doing: "cannot resume from ...")."""
    found = _read(Path(path))
    if isinstance(found, str):
        raise CheckpointError(f"cannot {purpose} {path}: {found}")
    return found
