"""Reading an export folder back: modlm's remote-code folder, or a standard transformers folder (a dense
export, or a pretrained model). ``modlm.training.export`` writes them. Reading either needs no unpickling:
safetensors and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..model.errors import UserError
from ..model.hf_format import is_hf_folder
from ..model.transformer import MoDTransformer
from ..model.version import FormatError, record_of_folder
from .travel import data_settings


class ExportError(UserError):
    """A folder that is not a readable export, or a model that cannot be exported; the message says why."""


def load_export(folder: Path, device: str = "cpu") -> tuple[MoDTransformer, dict, Optional[dict]]:
    """The model (in eval mode, on ``device``), the data settings of an export folder (its ``tokenizer`` the
    folder itself, which holds the ``tokenizer.json``) and what its ``config.json`` records of the modlm that
    wrote it (None for a transformers folder modlm did not write; a remote-code folder of another format is
    refused: ``modlm.model.version``)."""
    if is_hf_folder(folder):  # a standard transformers folder (a dense export, or a pretrained model)
        model = MoDTransformer.from_hf(folder, route_every=0).to(device)
    else:
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise ExportError(f"{folder} is not a modlm export folder (expected config.json and model.safetensors)")
        try:
            model = MoDTransformer.from_pretrained(folder, map_location=device)
        except FormatError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure here means a broken export
            raise ExportError(f"cannot load export folder {folder}: {err}") from None
    data = data_settings(json.loads((folder / "data.json").read_text())) if (folder / "data.json").is_file() else {}
    if (folder / "tokenizer.json").is_file():
        data["tokenizer"] = str(folder)
    record = record_of_folder(json.loads((folder / "config.json").read_text()))
    return model.eval(), data, record
