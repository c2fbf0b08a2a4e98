"""Checkpoints a run writes: the writer (atomic), which one ``--ckpt_path last`` means, whether one fits
the run that resumes it, and the generator states it carries. Reading any saved model back is
``modlm.saved``'s.

* finding: ``resolve_last``, what ``--ckpt_path last`` means (the newest checkpoint of a run, a
  damaged one named);
* fitting: ``check_resume_shape`` (a fit resumed into another model shape is refused, naming the
  fields), ``check_state_dict_fits`` (the module's tensor check on load) and
  ``check_tokenizer_fits`` (a run whose tokenizer is not the checkpoint's is refused);
* the generator states a checkpoint carries (``rng_states``);
* writing: ``save_atomically`` writes under a hidden name and renames into place, so a save cut
  off never replaces a good file (``modlm.training.trainer.ModLMTrainer.save_checkpoint`` uses it
  for every save of a run).

A Lightning checkpoint written by ``train.py`` holds the model weights under ``state_dict`` with
the ``model.`` prefix, the module's hyperparameters, the data module's settings, and what travels
with the model (its tokenizer and validation windows: ``modlm.training.travel``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from ..data import ModLMDataModule
from ..data.tokenizer import fingerprint
from ..model.config import ModelConfig
from ..saved.files import CheckpointError, checkpoint_damage, read_checkpoint, read_sharded_meta
from ..saved.travel import tokenizer_of
from .pretrained import pretrained_config


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose tensors do not fit the model this run builds (another shape or vocab)."""


# --- does it fit -----------------------------------------------------------------------------------
def check_resume_shape(ckpt_path: str, wanted: dict) -> None:
    """Refuse, naming the fields, to resume a fit from a checkpoint of another model shape.

    ``wanted`` holds the run's ``--model.*`` values (unset ones are not compared). Run before
    Lightning rebuilds the module from the checkpoint's hyperparameters, which would silently
    override them.
    """
    saved = read_checkpoint(ckpt_path).get("hyper_parameters") or {}
    if wanted.get("init_from"):  # the pretrained folder decides the architecture, as when the run began
        wanted = wanted.as_dict() if hasattr(wanted, "as_dict") else dict(wanted)
        config, _ = pretrained_config(wanted["init_from"], {**wanted, "vocab_size": None})
        # the command line sets the vocabulary from the tokenizer at instantiation: not compared here
        wanted = {**wanted, **config.to_dict(), "vocab_size": None}
    diffs = ModelConfig.tensor_differences(saved, wanted)
    if diffs:
        raise CheckpointMismatchError(f"checkpoint {ckpt_path} is another model shape: " + "; ".join(diffs))


def check_state_dict_fits(own: dict, saved: dict) -> None:
    """Raise ``CheckpointMismatchError`` naming the first tensors that differ in shape, are missing
    or are unexpected, before torch's longer ``load_state_dict`` error."""
    problems = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in saved.items()
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if problems or missing or unexpected:
        details = problems[:3] + [f"missing {k}" for k in missing[:2]] + [f"unexpected {k}" for k in unexpected[:2]]
        raise CheckpointMismatchError(
            "checkpoint does not fit this model (another shape or vocabulary?): " + "; ".join(details)
        )


# --- generator states ------------------------------------------------------------------------------
RNG_KEY = "torch_rng_states"
"""Where a checkpoint keeps torch's generator states (Lightning saves none of them)."""


def rng_states() -> dict:
    """torch's CPU generator state and that of this process's own CUDA device (None without one), to
    save. They decide random routing (the control runs) and nothing else in modlm; without them a
    resumed random-routing run picks other tokens.

    Only the own device's: each rank of a multi-GPU run draws on its own device, so in rank 0's
    process (the one that writes the checkpoint) every other device's generator is still at its
    seed. Saving those and restoring them on every rank made ranks other than 0 restart their draws.
    """
    own = torch.cuda.get_rng_state(torch.cuda.current_device()) if torch.cuda.is_available() else None
    return {"cpu": torch.get_rng_state(), "device": own}


def restore_rng_states(states: dict) -> None:
    """Put back ``rng_states()``, each rank into its own device's generator. Every rank is seeded
    alike (seed_everything) and draws alike, so rank 0's saved states are every rank's, whatever
    the GPU count."""
    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available() and states.get("device") is not None:
        torch.cuda.set_rng_state(states["device"], torch.cuda.current_device())


# --- the tokenizer ------------------------------------------------------------------------------------
def check_tokenizer_fits(checkpoint: dict, datamodule) -> None:
    """Refuse, naming both fingerprints, a run whose data module tokenizes with another tokenizer
    than the checkpoint's (a corpus that changed, so its tokenizer was retrained; other settings).
    A checkpoint of a run whose data module was not modlm's carries none: nothing to check."""
    saved = tokenizer_of(checkpoint)
    if not isinstance(datamodule, ModLMDataModule) or saved is None:
        return
    want, have = fingerprint(saved), datamodule.tokenizer_fingerprint
    if want != have:
        raise CheckpointMismatchError(
            f"the checkpoint's tokenizer (fingerprint {want[:12]}) is not this run's ({have[:12]}, "
            f"{datamodule.tokenizer_file}): "
            "the corpus or the tokenizer settings changed since it was trained; keep its tokenizer with "
            "--data.tokenizer CHECKPOINT, or train from scratch"
        )


# --- writing without ever leaving half a checkpoint behind --------------------------------------
def _partial_name(path: Path) -> Path:
    # Hidden, in the same folder: a rename within one file system is atomic, and `last` never
    # considers hidden names. The same on every rank, so all shards of a sharded save meet there.
    return path.with_name(f".{path.name}.partial")


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def save_atomically(trainer, filepath, write: Callable[[Path], None]) -> None:
    """``write(hidden_path)`` (the trainer's save), then a rename of its output onto ``filepath``.

    Lightning writes a file through a temporary file in the system's temp folder and *copies* it
    into place when that is another file system, and a sharded checkpoint folder in place, shard by
    shard: a process killed meanwhile leaves a truncated ``last.ckpt`` where a good one was. Here
    the previous checkpoint stays whole until the new one is complete. A link at ``filepath``
    (``last.ckpt`` links to the newest step) is replaced, never written through: a sharded save
    through it would overwrite the shards of the step it links to. Call it on every rank (the
    save itself is collective)."""
    path = Path(filepath)
    partial = _partial_name(path)
    strategy = trainer.strategy
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(partial)  # left by a save that was cut off
    strategy.barrier("modlm.save_atomically.start")
    write(partial)
    if trainer.is_global_zero:
        if path.is_symlink():
            path.unlink()
        if partial.is_dir() and path.is_dir():
            # os.replace cannot put a folder onto a non-empty folder: move the old one aside first.
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(partial, path)
            _remove(old)
        else:
            if path.is_dir():
                _remove(path)
            os.replace(partial, path)
    strategy.barrier("modlm.save_atomically.end")


# --- which checkpoint `--ckpt_path last` means ---------------------------------------------------
_STEP_IN_NAME = re.compile(r"(?:^|[-_])step=(\d+)")


def checkpoint_step(path) -> Optional[int]:
    """The optimizer step a checkpoint was saved at: from its name where it carries one (the run's
    ``step=0000200.ckpt``; for the ``last.ckpt`` link, its target's), else read from the file or a
    sharded folder's ``meta.pt``; None when it cannot be read (a damaged file)."""
    p = Path(path)
    name = p.resolve().name if p.is_symlink() else p.name
    found = _STEP_IN_NAME.search(Path(name).stem)
    if found:
        return int(found.group(1))
    if p.is_dir():
        try:
            return read_sharded_meta(p).get("global_step")
        except (CheckpointError, OSError, RuntimeError):
            return None
    try:
        return read_checkpoint(p).get("global_step")
    except CheckpointError:  # damaged
        return None


def checkpoint_candidates(checkpoint_dir, root_dir=None) -> list[Path]:
    """Every checkpoint a run may have written, newest first: ``*.ckpt`` in ``checkpoint_dir``
    (``ModelCheckpoint``'s and the pre-emption save), and Lightning's own ``hpc_ckpt_N.ckpt`` in
    ``root_dir``. Hidden names (a save in progress) are skipped.

    Newest means the furthest trained: the highest step, then the latest modification time. Steps
    first, because a copied run folder (``cp -r``) gives every file the time of the copy. A file
    whose step cannot be read (damaged) counts as newest if it was modified after every readable
    one (likely the save that was cut off), else as oldest."""
    found = []
    for folder, pattern in ((checkpoint_dir, "*.ckpt"), (root_dir, "hpc_ckpt_*.ckpt")):
        if folder is not None and Path(folder).is_dir():
            found += [p for p in Path(folder).glob(pattern) if not p.name.startswith(".") and p.exists()]
    found = sorted(set(found))

    def modified(p: Path) -> int:
        return p.stat().st_mtime_ns  # through a symlink: its target's time

    steps = {p: checkpoint_step(p) for p in found}
    latest_readable = max((modified(p) for p in found if steps[p] is not None), default=-1)

    def rank(p: Path) -> float:
        if steps[p] is not None:
            return steps[p]
        return math.inf if modified(p) > latest_readable else -math.inf

    # a link (save_last="link") and its target tie; prefer the real file, then the name
    return sorted(found, key=lambda p: (rank(p), modified(p), not p.is_symlink(), p.name), reverse=True)


def resolve_last(checkpoint_dir, root_dir=None) -> Path | None:
    """The newest (furthest-trained) checkpoint in a run's folders (None if there is none yet).

    Whichever path wrote it: the periodic ``ModelCheckpoint``, ``last.ckpt``, the pre-emption save,
    or Lightning's SLURM handler. If the newest one is damaged (a process killed while another
    program wrote it, a disk that filled up), refuse and name both it and the newest intact one:
    silently going back further would retrain steps the user believes are saved."""
    candidates = checkpoint_candidates(checkpoint_dir, root_dir)
    if not candidates:
        return None
    newest = candidates[0]
    damage = checkpoint_damage(newest)
    if damage is None:
        return newest
    intact = next((p for p in candidates[1:] if checkpoint_damage(p) is None), None)
    hint = (
        f"resume from the newest intact one with --ckpt_path {intact}"
        if intact
        else "no intact checkpoint is left; start afresh without --ckpt_path"
    )
    raise CheckpointError(f"the newest checkpoint {newest} is damaged ({damage}); {hint}, or move the damaged one away")
