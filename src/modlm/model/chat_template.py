"""A model's chat template as its folders keep it: read from a transformers or modlm folder, written beside
an export's tokenizer (the special tokens a template sees are ``hf_format.template_tokens``).

The template is jinja text carried by the model (``MoDTransformer.chat_template``) like its tokenizer;
rendering it is the data layer's (``modlm.data.chat``, with transformers' renderer), so this file
imports no template engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from .errors import UserError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""Where a folder keeps its chat template (transformers 5 writes and reads it there; older folders keep
it in ``tokenizer_config.json``)."""


def read_chat_template(folder: Union[str, Path]) -> Optional[str]:
    """The chat template of a transformers or modlm folder: ``chat_template.jinja``, else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates: the one named
    ``default``); None when it has none."""
    folder = Path(folder)
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        found = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError):
        raise UserError(f"{config} is not a JSON object") from None
    if isinstance(found, list):  # several named templates: the default one is the chat template
        found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
    return found if isinstance(found, str) and found.strip() else None


def write_chat_template(folder: Union[str, Path], template: Optional[str]) -> None:
    """Write ``template`` as ``folder/chat_template.jinja`` (nothing without one)."""
    if template is not None:
        (Path(folder) / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
