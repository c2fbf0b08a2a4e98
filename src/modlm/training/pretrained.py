"""A run that starts from a pretrained transformers model (``--model.init_from``): which model it builds.

The architecture is the checkpoint's (``modlm.model.hf_format`` reads it); the run chooses the rest
(routing, capacities, context length). Used where a fit is built (``MoDLightningModule``) and where a
resumed fit is checked against its checkpoint (``checkpoint.check_resume_shape``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..model.config import ModelConfig
from ..model.errors import UserError
from ..model.hf_format import ARCHITECTURE_FIELDS, architecture_of, config_from_hf, read_config, resolve


def pretrained_config(init_from: str, run: dict) -> tuple[ModelConfig, Path]:
    """The model a run from a pretrained folder or Hub id builds, and the folder: the architecture is
    the checkpoint's (a run value that is not the field's default must agree with it; the vocabulary,
    which the command line sets to the tokenizer's, may be smaller: token ids the tokenizer never
    produces keep their rows), everything else the run's."""
    folder = resolve(init_from)
    arch = architecture_of(folder)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for field in ARCHITECTURE_FIELDS:
        value = run.get(field)
        if field == "vocab_size":
            if value is not None and value > arch[field]:
                raise UserError(
                    f"the tokenizer has {value} tokens, more than the pretrained model's vocabulary "
                    f"({arch[field]}): use the model's own tokenizer (--data.tokenizer {init_from})"
                )
        elif value is not None and value != defaults[field] and value != arch[field]:
            raise UserError(
                f"--model.{field}={value!r} conflicts with the pretrained checkpoint's {field}={arch[field]!r} "
                f"({init_from}): its weights decide it"
            )
    overrides = {k: v for k, v in run.items() if k not in ARCHITECTURE_FIELDS and k in defaults}
    return config_from_hf(read_config(folder), **overrides), folder
