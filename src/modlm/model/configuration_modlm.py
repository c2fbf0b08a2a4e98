"""transformers' view of a ``ModelConfig``: the config class of an exported folder's remote code.

``eval.py --export`` copies this file, ``modeling_modlm.py`` and the model's own source files
into the folder, so ``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` need transformers and torch, not modlm. The modlm fields live in the
same ``config.json`` as transformers' keys; defaults and validation are ``ModelConfig``'s alone.
"""

from __future__ import annotations

from dataclasses import fields

from transformers import PretrainedConfig

from .config import ModelConfig

MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig))


class ModLMConfig(PretrainedConfig):
    model_type = "modlm"
    # transformers' generic names for the modlm fields that mean the same thing
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(self, **kwargs):
        model = ModelConfig.from_hparams(kwargs)  # validates, fills the derived widths
        rest = {k: v for k, v in kwargs.items() if k not in MODEL_FIELDS}
        rest["tie_word_embeddings"] = model.tie_embeddings  # transformers ties by this flag
        super().__init__(**rest)
        for name in MODEL_FIELDS:
            setattr(self, name, getattr(model, name))
