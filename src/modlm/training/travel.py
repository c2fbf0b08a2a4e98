"""What a run puts in its checkpoints for the model to travel with: its tokenizer and validation windows
(read back by ``modlm.saved.travel``), and the routed blocks' decision thresholds calibrated on those
windows for these very weights."""
from __future__ import annotations

from typing import Optional

import torch

from ..data import ModLMDataModule
from ..data.tokenizer import fingerprint
from ..saved.travel import CHAT_TEMPLATE_KEY, SPREADS_KEY, THRESHOLDS_KEY, TOKENIZER_KEY, WINDOWS_KEY  # noqa: F401

CALIBRATION_WINDOWS = 64
"""At most this many validation windows calibrate the decision thresholds of a saved model."""


def record(datamodule) -> dict:
    """What a checkpoint carries of a run's data module: its tokenizer and validation windows
    (nothing for another kind of data module)."""
    if not isinstance(datamodule, ModLMDataModule):
        return {}
    tok = datamodule.tokenizer
    out = {TOKENIZER_KEY: {"json": tok.to_str(), "sha256": fingerprint(tok)}}
    windows = datamodule.validation_windows
    if windows is not None and len(windows):
        dtype = torch.int16 if tok.get_vocab_size() <= 2**15 else torch.int32
        out[WINDOWS_KEY] = windows.to(dtype).clone()
    return out


def calibrate(model, datamodule) -> Optional[list[float]]:
    """Calibrate ``model``'s decision thresholds on the run's validation windows (at most
    ``CALIBRATION_WINDOWS``), for a checkpoint to carry; None when there is nothing to calibrate."""
    if not isinstance(datamodule, ModLMDataModule) or not model.config.n_deciders:
        return None
    windows = datamodule.validation_windows[:CALIBRATION_WINDOWS, :-1]
    if not len(windows):
        return None
    device = next(model.parameters()).device
    return model.calibrate(windows.to(device)) or None
