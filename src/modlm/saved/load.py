"""A saved model and what travels with it, from any form modlm saves or reads: a checkpoint file, an FSDP2
sharded checkpoint folder, an export folder, a standard transformers folder, or a Hugging Face Hub id.

The one reader every command that uses a trained model goes through (evaluation, generation, serving,
benchmarks); the checkpoint format itself (what a run writes) is ``modlm.training``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Tokenizer

from ..analysis.flops import training_flops
from ..data.tokenizer import load_tokenizer
from ..model.config import ModelConfig
from ..model.errors import UserError, first_line
from ..model.transformer import MoDTransformer
from ..model.version import VERSION_KEY, check_format
from .adapters import ADAPTER_BASE_KEY, adapted_model
from .export import load_export
from .files import CheckpointError, read_checkpoint, read_sharded, read_sharded_meta
from .travel import chat_template_of, data_settings, loss_mask_of, tokenizer_of, unpack, windows_of


@dataclass
class SavedModel:
    """A trained model and what travels with it, read from any of the forms modlm saves."""

    model: MoDTransformer
    """In eval mode, on the device it was loaded to."""
    data: dict
    """The data settings it was trained with (``--data.*``; an export's ``data.json``)."""
    tokenizer: Optional[Tokenizer]
    """Its tokenizer; None for a checkpoint of a run whose data module was not modlm's."""
    validation_windows: Optional[torch.Tensor]
    """The (n, seq_len + 1) windows it was validated on (checkpoints only)."""
    path: str
    """Where it was read from."""
    trained: dict
    """What training it had, where known: ``steps``, ``tokens``, ``flops`` (all ranks)."""
    validation_loss_mask: Optional[torch.Tensor] = None
    """Which targets of ``validation_windows`` carry the loss, (n, seq_len) bools (chat data: the assistant's
    tokens); None: every one."""
    written_by: Optional[dict] = None
    """The modlm that wrote it (``{"version", "format"}``: ``modlm.model.version``); None for a transformers
    folder modlm did not write."""

    @property
    def chat_template(self) -> Optional[str]:
        """The chat template its conversations are rendered with (jinja text; None: it has none, and
        ``modlm.data.chat`` renders with modlm's default): an export or transformers folder's
        (``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``), a checkpoint's (what its run
        trained with). The model carries it (``MoDTransformer.chat_template``), so that ``save_pretrained``,
        ``to_hf`` exports and Hub pushes keep it."""
        return self.model.chat_template


def _hub_folder(repo_id: str) -> Path:
    """A Hub model repository's files (an export folder), downloaded or found in the local cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:  # noqa: BLE001 - offline, not found, gated: the user's to fix
        first = first_line(err)
        raise CheckpointError(
            f"checkpoint not found: {repo_id} is no local path, and the Hub cannot give it ({first})"
        ) from None


def saved_data(path) -> tuple[dict, Optional[Tokenizer], Optional[torch.Tensor]]:
    """What travels with a checkpoint (file or sharded folder), without building its model: its
    data settings, tokenizer (None: its run's data module was not modlm's) and validation windows."""
    p = Path(path)
    ckpt = read_sharded_meta(p) if p.is_dir() else read_checkpoint(p, purpose="read checkpoint")
    check_format(ckpt.get(VERSION_KEY), str(path))
    data = data_settings(ckpt.get("datamodule_hyper_parameters") or {})
    return data, tokenizer_of(ckpt), windows_of(ckpt)


def unpack_saved(path, cache_dir: Optional[str] = None, windows: bool = False) -> Path:
    """A checkpoint's tokenizer and chat template (and, with ``windows``, its validation windows and their loss
    mask) as a prepared folder (``travel.unpack``): what ``--data.tokenizer`` (``--data.source``) name to read
    its data; a CheckpointError for one that carries no tokenizer."""
    p = Path(path)
    ckpt = read_sharded_meta(p) if p.is_dir() else read_checkpoint(p, purpose="read checkpoint")
    tokenizer = tokenizer_of(ckpt)
    if tokenizer is None:
        raise CheckpointError(
            f"{path} carries no tokenizer (its run's data module was not modlm's): name a tokenizer.json instead"
        )
    return unpack(
        tokenizer,
        windows_of(ckpt) if windows else None,
        cache_dir,
        loss_mask=loss_mask_of(ckpt) if windows else None,
        chat_template=chat_template_of(ckpt),
    )


def load_saved(path: str, device: str = "cpu") -> SavedModel:
    """A ``SavedModel`` from a checkpoint file, an FSDP2 sharded checkpoint folder, an export
    folder, or a Hugging Face Hub id (``hub:OWNER/NAME`` or ``OWNER/NAME``: an export pushed there). A
    checkpoint of LoRA adapters is read with the pretrained folder they adapt, merged (``adapters.py``)."""
    p = Path(path).expanduser()
    if not p.exists():
        if path.startswith("hub:") or path.count("/") == 1 and not path.startswith((".", "/", "~")):
            p = _hub_folder(path.removeprefix("hub:"))
        else:
            raise CheckpointError(f"checkpoint not found: {path}")
    if p.is_dir() and not (p / ".metadata").is_file():
        model, data, record = load_export(p, device)
        tokenizer = load_tokenizer(p / "tokenizer.json") if (p / "tokenizer.json").is_file() else None
        return SavedModel(model, data, tokenizer, None, str(path), {}, written_by=record)
    ckpt = read_sharded(p) if p.is_dir() else read_checkpoint(p, purpose="read checkpoint")
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or "state_dict" not in ckpt or "d_model" not in hparams:
        raise CheckpointError(f"{path} is not a modlm checkpoint (no model hyperparameters in it)")
    record = check_format(ckpt.get(VERSION_KEY), str(path))
    try:
        config = ModelConfig.from_hparams(hparams)
    except (TypeError, UserError) as err:
        raise CheckpointError(f"{path} holds an invalid model config: {err}") from None
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if hparams.get("tune") == "lora":  # adapters over a pretrained folder: rebuilt, merged
        model = adapted_model(str(path), config, hparams, weights, ckpt.get(ADAPTER_BASE_KEY))
    else:
        model = MoDTransformer(config)
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: weights do not fit its own config: {str(err).splitlines()[0]}") from None
    data = data_settings(ckpt.get("datamodule_hyper_parameters") or {})
    tokenizer = tokenizer_of(ckpt)
    if tokenizer is not None:
        model.tokenizer_json = tokenizer.to_str()  # so that save_pretrained / push_to_hub carry it
    model.chat_template = chat_template_of(ckpt)
    return SavedModel(
        model.to(device).eval(),
        data,
        tokenizer,
        windows_of(ckpt),
        str(path),
        trained(ckpt, config),
        loss_mask_of(ckpt),
        record,
    )


def trained(ckpt: dict, config: ModelConfig) -> dict:
    """Steps, tokens and FLOPs of the training a checkpoint has had (tokens from the FLOPs meter's
    total: every rank's, at the windows' length)."""
    out = {"steps": ckpt.get("global_step")}
    flops = next(
        (
            state.get("total")
            for key, state in (ckpt.get("callbacks") or {}).items()
            if key.startswith("FlopsMeter") and isinstance(state, dict)
        ),
        None,
    )
    seq_len = (ckpt.get("datamodule_hyper_parameters") or {}).get("seq_len") or config.max_seq_len
    if flops:
        out["flops"] = flops
        out["tokens"] = round(flops / training_flops(config, seq_len) * seq_len)
    return out
