"""Saved models: reading them, exporting them, and deciding whether one fits a model.

The one place to change the checkpoint format. Which ``ModelConfig`` fields decide the tensors is
``ModelConfig.TENSOR_FIELDS``; how a config comes back from saved hyperparameters is
``ModelConfig.from_hparams``. Everything else that reads or checks a saved model is here: the
command line's refusal to resume a fit into another shape, the module's tensor check on load, the
generator states a checkpoint carries, and evaluation's loading and export.

Writing and finding: ``save_atomically`` writes every checkpoint under a hidden name and renames it
into place (a save cut off never replaces a good file); ``resolve_last`` is what ``--ckpt_path
last`` means (the newest checkpoint of a run, a damaged one named).

Two forms: a Lightning checkpoint written by ``train.py`` (model weights under ``state_dict`` with
the ``model.`` prefix, the module's hyperparameters, the data module's settings), and an export
folder (``model.safetensors``, ``config.json``, ``tokenizer.json``, ``data.json``, a model card,
and the files that let transformers load it: see ``hf_export``). Both are read without unpickling
code: checkpoints with ``torch.load(weights_only=True)``, exports with safetensors and JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..model.config import ModelConfig
from .export import transformers_config, write_transformers_files
from ..model.transformer import MoDTransformer


class CheckpointError(ValueError):
    """A file or folder that is not a readable modlm model; the message names it."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not fit the model this run builds (another shape or vocab)."""


# --- does it fit -----------------------------------------------------------------------------------
def check_resume_shape(ckpt_path: str, wanted: dict) -> None:
    """Refuse, naming the fields, to resume a fit from a checkpoint of another model shape.

    ``wanted`` holds the run's ``--model.*`` values (unset ones are not compared). Run before
    Lightning rebuilds the module from the checkpoint's hyperparameters, which would silently
    override them.
    """
    saved = read_checkpoint(ckpt_path).get("hyper_parameters", {})
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
    """torch's CPU and CUDA generator states, to save. They decide random routing (the control
    runs) and nothing else in modlm; without them a resumed random-routing run picks other tokens."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict) -> None:
    """Put back ``rng_states()``. Every rank is seeded alike (seed_everything) and draws alike, so
    rank 0's saved state is every rank's; a checkpoint from another GPU count restores the CPU
    generator only."""
    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# --- reading and exporting ---------------------------------------------------------------------------

def load_model(path: str, device: str = "cpu") -> tuple[MoDTransformer, dict]:
    """The model (in eval mode, on ``device``) and the data settings it was trained with."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if p.is_dir():
        return _load_export(p, device)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - corrupt, truncated, or content that is not plain data
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint, truncated, or it holds objects "
            "other than tensors and plain values (modlm never unpickles code)"
        ) from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in ckpt or "d_model" not in hparams:
        raise CheckpointError(f"{path} is not a modlm checkpoint (no model hyperparameters in it)")
    try:
        config = ModelConfig.from_hparams(hparams)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path} holds an invalid model config: {err}") from None
    model = MoDTransformer(config)
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit its own config: {str(err).splitlines()[0]}") from None
    data = {k: v for k, v in (ckpt.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
    return model.to(device).eval(), data


def _load_export(folder: Path, device: str) -> tuple[MoDTransformer, dict]:
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{folder} is not a modlm export folder (expected config.json and model.safetensors)")
    try:
        model = MoDTransformer.from_pretrained(folder, map_location=device)
    except Exception as err:  # noqa: BLE001 - any failure here means a broken export
        raise CheckpointError(f"cannot load export folder {folder}: {err}") from None
    data = json.loads((folder / "data.json").read_text()) if (folder / "data.json").is_file() else {}
    if (folder / "tokenizer.json").is_file():
        data["tokenizer_path"] = str(folder / "tokenizer.json")
    return model.eval(), data


def export(model: MoDTransformer, tokenizer, data_settings: dict, folder: Path) -> None:
    """Write an export folder: the model (``save_pretrained``: safetensors and ``config.json``), its
    tokenizer, its data settings (without the tokenizer path, which the folder's own
    ``tokenizer.json`` replaces), and what lets transformers load it (``hf_export``)."""
    from ..data.tokenizer import EOT_TOKEN

    folder = Path(folder)
    eos_id = tokenizer.token_to_id(EOT_TOKEN)
    if eos_id is None:
        raise CheckpointError(f"the tokenizer has no {EOT_TOKEN} token: nothing would end a generation")
    config = {**model.config.to_dict(), **transformers_config(model.config, eos_id, model.embed.weight.dtype)}
    model.save_pretrained(folder, config=config)
    tokenizer.save(str(folder / "tokenizer.json"))
    write_transformers_files(folder, model.config, EOT_TOKEN, eos_id)
    data = {k: v for k, v in data_settings.items() if not k.startswith("_") and k != "tokenizer_path"}
    (folder / "data.json").write_text(json.dumps(data, indent=2) + "\n")


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


def save_atomically(trainer, filepath, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint`` into a hidden name beside ``filepath``, then a rename onto it.

    Lightning writes a file through a temporary file in the system's temp folder and *copies* it
    into place when that is another file system, and a sharded checkpoint folder in place, shard by
    shard: a process killed meanwhile leaves a truncated ``last.ckpt`` where a good one was. Here
    the previous checkpoint stays whole until the new one is complete. Call it on every rank (the
    save itself is collective)."""
    path = Path(filepath)
    partial = _partial_name(path)
    strategy = trainer.strategy
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(partial)  # left by a save that was cut off
    strategy.barrier("modlm.save_atomically.start")
    trainer.save_checkpoint(partial, weights_only)
    if trainer.is_global_zero:
        if partial.is_dir() and (path.is_dir() and not path.is_symlink()):
            # os.replace cannot put a folder onto a non-empty folder: move the old one aside first.
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(partial, path)
            _remove(old)
        else:
            if path.is_dir() and not path.is_symlink():
                _remove(path)
            os.replace(partial, path)
    strategy.barrier("modlm.save_atomically.end")


# --- which checkpoint `--ckpt_path last` means ---------------------------------------------------
def checkpoint_damage(path) -> str | None:
    """None if ``path`` reads as a checkpoint, else what is wrong with it (a few words).

    A file is opened with ``torch.load(weights_only=True, mmap=True)``: cheap (tensors are not
    read) and it never unpickles code. A sharded folder must hold the ``.metadata`` index, which
    torch's distributed checkpoint writes last."""
    p = Path(path)
    if p.is_dir():
        return None if (p / ".metadata").is_file() else "a sharded checkpoint folder without its .metadata index"
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated, or objects that are not plain data
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if any(m in reason.lower() for m in ("weights only", "weights_only", "unsupported global")):
            return "it holds pickled objects other than tensors and plain values (modlm never unpickles code)"
        return f"not a readable PyTorch checkpoint (truncated or corrupt: {reason[:120]})"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt and "loops" not in ckpt:
        return "not a Lightning checkpoint"
    return None


def read_checkpoint(path) -> dict:
    """A checkpoint file's contents, read with ``weights_only=True``; a ``CheckpointError`` naming
    the file and what is wrong otherwise."""
    damage = checkpoint_damage(path)
    if damage:
        raise CheckpointError(f"cannot resume from {path}: {damage}")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def checkpoint_candidates(checkpoint_dir, root_dir=None) -> list[Path]:
    """Every checkpoint a run may have written, newest first: ``*.ckpt`` in ``checkpoint_dir``
    (``ModelCheckpoint``'s and the pre-emption save), and Lightning's own ``hpc_ckpt_N.ckpt`` in
    ``root_dir``. Hidden names (a save in progress) are skipped."""
    found = []
    for folder, pattern in ((checkpoint_dir, "*.ckpt"), (root_dir, "hpc_ckpt_*.ckpt")):
        if folder is not None and Path(folder).is_dir():
            found += [p for p in Path(folder).glob(pattern) if not p.name.startswith(".") and p.exists()]

    def modified(p: Path) -> int:
        return p.stat().st_mtime_ns  # through a symlink: its target's time

    # a link (save_last="link") and its target tie; prefer the real file, then the name
    return sorted(set(found), key=lambda p: (modified(p), not p.is_symlink(), p.name), reverse=True)


def resolve_last(checkpoint_dir, root_dir=None) -> Path | None:
    """The newest checkpoint in a run's folders (None if there is none yet).

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
    hint = (f"resume from the newest intact one with --ckpt_path {intact}" if intact
            else "no intact checkpoint is left; start afresh without --ckpt_path")
    raise CheckpointError(f"the newest checkpoint {newest} is damaged ({damage}); {hint}, "
                          "or move the damaged one away")
