"""Export folders: writing one (``write_export``; ``modlm.model.hf_format.upload_folder`` pushes it to the Hub);
reading one back is ``modlm.saved.export``'s.

An export folder is what ``MoDTransformer.to_hf`` writes (``modlm.model.hf_format``), plus
``data.json`` (the data settings it was trained with) and a model card with its figures:

* a dense model (no routed blocks, no experts, SwiGLU) as a standard transformers folder:
  ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` with query/key/value biases), which transformers loads
  with no code of ours;
* any other model as modlm's remote-code folder: ``model.safetensors``, ``config.json`` of the
  ``ModelConfig`` fields, ``tokenizer.json`` and the ``modlm/model`` folder copied whole (its
  ``__init__.py`` aside), loaded with ``trust_remote_code=True``. Its files import each other
  relatively and nothing else of modlm, so the folder needs transformers and torch but not modlm;
  ``relative_imports`` is what the tests use to hold the model package to that rule.

Reading either needs no unpickling: safetensors and JSON. No transformers import here.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Optional

from ..model.config import ModelConfig
from ..model.hf_format import remote_code_files  # noqa: F401 - remote_code_files: the tests' name for it
from ..model.transformer import MoDTransformer
from ..saved import travel

ENTRY_FILES = ("configuration_modlm.py", "modeling_modlm.py")


def relative_imports(path: Path) -> set[str]:
    """Modules of the same package that ``path`` imports (``from .x import y``), by file name; an
    import from a parent package (``from ..x``), which a flat export folder cannot follow, is an error."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:  # from . import a, b
                found.update(f"{alias.name}.py" for alias in node.names)
            else:
                found.add(f"{node.module.split('.')[0]}.py")
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            raise ValueError(f"{path.name} imports from a parent package: remote code cannot follow it")
    return found


def write_export(model: MoDTransformer, tokenizer, data_settings: dict, folder: Path, card: str = "") -> str:
    """Write an export folder (``model.to_hf``: a standard transformers folder for a dense Llama-form
    model, the remote-code one for any other; a model card with ``card`` in it) and its data
    settings (without the tokenizer, which the folder's own ``tokenizer.json`` replaces). A model with a
    chat template whose end of turn is not its end-of-text token (ChatML's ``<|im_end|>``) has both as
    ``generation_config.json``'s ``eos_token_id``, so transformers' ``generate`` ends an answer where modlm's
    does. Returns which kind it wrote (``"standard"`` or ``"remote-code"``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = model.to_hf(folder, tokenizer, card=card)
    data = {k: v for k, v in travel.data_settings(data_settings).items() if k != "tokenizer"}
    (folder / "data.json").write_text(json.dumps(data, indent=2) + "\n")
    if model.chat_template is not None:
        _stop_at_end_of_turn(folder, model.chat_template)
    return kind


def _stop_at_end_of_turn(folder: Path, template: str) -> None:
    from ..data.chat import ChatEncoder

    end = ChatEncoder((folder / "tokenizer.json").read_text(encoding="utf-8"), template).end_of_turn_id
    path = folder / "generation_config.json"
    generation = json.loads(path.read_text())
    if end != generation["eos_token_id"]:
        path.write_text(json.dumps({**generation, "eos_token_id": [generation["eos_token_id"], end]}, indent=2) + "\n")


def model_card(config: ModelConfig, trained: dict, results: Optional[dict] = None) -> str:
    """The part of a model card that says what this model is: its routing, what it was trained on
    (steps, tokens, FLOPs) and, when given, ``eval.py``'s figures."""
    routed = config.routed_layers
    lines = [
        "",
        "| | |",
        "|---|---|",
        f"| shape | d_model {config.d_model}, {config.n_layers} blocks, {config.n_heads} heads, vocabulary "
        f"{config.vocab_size}, context {config.max_seq_len} |",
        (
            f"| routing | blocks {', '.join(map(str, routed))} routed at capacity "
            f"{' / '.join(f'{c:g}' for c in dict.fromkeys(config.layer_capacities))} "
            f"(causal decision: {config.causal_method}; update weight: {config.router_weight}) |"
        )
        if routed
        else "| routing | none: a dense model |",
    ]
    if config.recursive:
        lines.append(
            f"| recursion | a stack of {config.stack_layers} blocks shared by {config.recursions} recursion steps "
            f"({config.recursion_sharing}; {config.recursion_routing}, step capacities "
            f"{' / '.join(f'{c:.3g}' for c in config.step_capacities)}) |"
        )
    if config.n_experts:
        lines.append(
            f"| experts | {config.n_experts} per MLP of blocks {', '.join(map(str, config.expert_layers))}"
            f" (top-{config.expert_top_k}, {config.noop_experts} no-op) |"
        )
    for key, label in (("steps", "training steps"), ("tokens", "training tokens"), ("flops", "training FLOPs")):
        if trained.get(key):
            lines.append(f"| {label} | {trained[key]:.4g} |" if key == "flops" else f"| {label} | {trained[key]:,} |")
    for key, label in (
        ("topk.loss", "validation loss (top-k routing)"),
        ("causal.loss", "validation loss (causal routing)"),
        ("causal.capacity_used", "share processed by routed blocks (causal)"),
        ("flops_per_token", "forward FLOPs per token (causal)"),
        ("decode_tokens_per_s", "decode tokens/s (batch 1)"),
    ):
        if results and key in results:
            lines.append(f"| {label} | {results[key]:.4g} |")
    return "\n".join(lines) + "\n"
