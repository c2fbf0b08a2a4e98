"""What a run puts in its checkpoints for the model to travel with: its tokenizer, chat template and validation
windows (with their loss mask, for chat data; read back by ``modlm.saved.travel``); and the calibration of the
routers' causal decisions on those windows, done before every save so that the thresholds the weights carry
fit them."""

from __future__ import annotations

from typing import Optional

import torch

from ..data import ModLMDataModule
from ..data.tokenizer import fingerprint
from ..saved.travel import CHAT_TEMPLATE_KEY, LOSS_MASK_KEY, TOKENIZER_KEY, WINDOWS_KEY

CALIBRATION_WINDOWS = 64
"""At most this many validation windows calibrate the decision thresholds of a saved model."""


def record(datamodule) -> dict:
    """What a checkpoint carries of a run's data module: its tokenizer, its chat template (chat data's, or
    the tokenizer's own) and its validation windows with, for chat data, their loss mask (nothing for
    another kind of data module)."""
    if not isinstance(datamodule, ModLMDataModule):
        return {}
    tok = datamodule.tokenizer
    out = {TOKENIZER_KEY: {"json": tok.to_str(), "sha256": fingerprint(tok)}}
    if datamodule.chat_template is not None:
        out[CHAT_TEMPLATE_KEY] = datamodule.chat_template
    windows = datamodule.validation_windows
    if windows is not None and len(windows):
        dtype = torch.int16 if tok.get_vocab_size() <= 2**15 else torch.int32
        out[WINDOWS_KEY] = windows.to(dtype).clone()
        if datamodule.validation_loss_mask is not None:
            out[LOSS_MASK_KEY] = datamodule.validation_loss_mask.clone()
    return out


def calibrate(model, datamodule) -> Optional[list[float]]:
    """Calibrate ``model``'s causal decisions on the run's validation windows (at most
    ``CALIBRATION_WINDOWS``), for a checkpoint to carry; the thresholds, or None when there is nothing
    to calibrate."""
    if not isinstance(datamodule, ModLMDataModule) or not model.routers():
        return None
    windows = datamodule.validation_windows[:CALIBRATION_WINDOWS, :-1]
    if not len(windows):
        return None
    device = next(model.parameters()).device
    return model.calibrate(windows.to(device)) or None
