"""What travels with a checkpoint, read back: its tokenizer, its validation windows and its data settings
(``modlm.training.travel`` writes them), and a checkpoint's tokenizer and windows unpacked for the data
module as a prepared folder.

Every checkpoint a run writes carries, beside the weights and hyperparameters, the tokenizer its model
reads (the ``tokenizer.json`` text and its fingerprint), its chat template when it has one, and the fixed
validation windows it was validated on.
So nothing that reads a checkpoint needs the training corpus: generation and export need
the tokenizer alone, evaluation and ``validate`` run on the stored windows (or on a corpus named
explicitly, tokenized with the checkpoint's tokenizer).

For the data module, a checkpoint's tokenizer and windows are unpacked into a prepared folder
(``unpack``): the data layer's own format (``meta.json``, ``tokenizer.json``, the windows as the
validation tokens, no training tokens), so a checkpoint reads as any other ``--data.source``.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tokenizers import Tokenizer

from ..data.corpus.prepared import FORMAT, META_FILE, VERSION, token_dtype
from ..data.tokenizer import TOKENIZER_FILE, default_cache_dir, end_of_text_id, fingerprint_json, tokenizer_from_str
from ..model.chat_template import write_chat_template

TOKENIZER_KEY = "tokenizer"
"""Checkpoint key of ``{"json": tokenizer.json text, "sha256": its fingerprint}``."""
WINDOWS_KEY = "validation_windows"
"""Checkpoint key of the (n, seq_len + 1) validation windows, as the smallest integer dtype holding them."""
LOSS_MASK_KEY = "validation_loss_mask"
"""Checkpoint key of the (n, seq_len) bools saying which targets of those windows carry the loss (chat data:
the assistant's tokens; absent for text, whose every target does)."""
CHAT_TEMPLATE_KEY = "chat_template"
"""Checkpoint key of the chat template (jinja text) the model's conversations are rendered with: the one its
run trained on chat data with, or the one of the pretrained folder it started from."""


def tokenizer_of(checkpoint: dict) -> Optional[Tokenizer]:
    """The tokenizer a checkpoint carries (None when its run's data module was not modlm's)."""
    saved = checkpoint.get(TOKENIZER_KEY)
    return tokenizer_from_str(saved["json"]) if isinstance(saved, dict) and "json" in saved else None


def chat_template_of(checkpoint: dict) -> Optional[str]:
    """The chat template a checkpoint carries (None: it has none)."""
    template = checkpoint.get(CHAT_TEMPLATE_KEY)
    return template if isinstance(template, str) else None


def windows_of(checkpoint: dict) -> Optional[torch.Tensor]:
    windows = checkpoint.get(WINDOWS_KEY)
    return None if windows is None else windows.long()


def loss_mask_of(checkpoint: dict) -> Optional[torch.Tensor]:
    """Which targets of a checkpoint's validation windows carry the loss (None: every one)."""
    mask = checkpoint.get(LOSS_MASK_KEY)
    return None if mask is None else mask.bool()


def unpack(
    tokenizer: Tokenizer,
    windows: Optional[torch.Tensor],
    cache_dir: Optional[str] = None,
    loss_mask: Optional[torch.Tensor] = None,
    chat_template: Optional[str] = None,
) -> Path:
    """A prepared folder of ``tokenizer`` (with its ``chat_template``, when given) and ``windows``
    (validation tokens only; with their ``loss_mask``, chat windows), written once per content under
    ``<cache_dir>/saved/`` and reused; what ``--data.source`` and ``--data.tokenizer`` name when a command
    reads a checkpoint's data."""
    tokenizer_json = tokenizer.to_str()
    tokens = np.zeros(0, dtype=np.int64) if windows is None else windows.numpy().reshape(-1).astype(np.int64)
    mask = None if loss_mask is None or windows is None else loss_mask.numpy().astype(np.uint8)
    digest = hashlib.sha256(tokenizer_json.encode("utf-8"))
    digest.update(tokens.tobytes())
    for extra in (mask.tobytes() if mask is not None else None, chat_template):
        digest.update(b"\0" if extra is None else b"\1" + (extra.encode("utf-8") if isinstance(extra, str) else extra))
    key = digest.hexdigest()[:16]
    folder = (Path(cache_dir) if cache_dir else default_cache_dir()) / "saved" / key
    if (folder / META_FILE).is_file():
        return folder
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex}")
    partial.mkdir(parents=True)
    dtype = token_dtype(tokenizer.get_vocab_size())
    (partial / TOKENIZER_FILE).write_text(tokenizer_json)
    (partial / "val-00000.bin").write_bytes(tokens.astype(dtype).tobytes())
    write_chat_template(partial, chat_template)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.str,
        "vocab_size": tokenizer.get_vocab_size(),
        "eot_id": end_of_text_id(tokenizer),
        "tokenizer_sha256": fingerprint_json(tokenizer_json),
        "source": "the validation windows stored in a checkpoint",
        "source_id": f"checkpoint:{key}",
        "documents": {"train": 0, "val": 0},
        "train": {"files": [], "tokens": []},
        "val": {"files": ["val-00000.bin"], "tokens": [int(len(tokens))]},
    }
    if mask is not None:
        (partial / "val-loss-mask.bin").write_bytes(mask.tobytes())
        meta["val_loss_mask"] = {
            "file": "val-loss-mask.bin",
            "windows": int(mask.shape[0]),
            "seq_len": int(mask.shape[1]),
        }
    (partial / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    try:
        os.replace(partial, folder)
    except OSError:  # another process unpacked the same content first
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    return folder


def data_settings(saved: dict) -> dict:
    """Saved data settings (a checkpoint's data module hyperparameters, an export's ``data.json``) as
    ``--data.*`` values (Lightning's private keys left out)."""
    return {k: v for k, v in saved.items() if not k.startswith("_")}
