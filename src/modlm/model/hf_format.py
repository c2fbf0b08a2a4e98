"""transformers folders: the Llama-family state-dict adapter, and the files of every folder modlm writes
for transformers.

Reading (``MoDTransformer.from_hf``): a folder (or a Hub id, through the local Hugging Face cache or a
download) holding a ``LlamaForCausalLM`` (Llama 2/3, SmolLM, TinyLlama), a ``MistralForCausalLM``
whose sliding window does not reach into the context, or a ``Qwen2ForCausalLM`` (biases on the
query/key/value projections): its ``config.json`` becomes a ``ModelConfig`` (``config_from_hf``) and
its safetensors weights, renamed and fused (``state_dict_from_hf``), the model's; every routed
block's router starts at zero. Anything else is refused with one line naming the field that is not
supported (``UnsupportedCheckpoint``). Only JSON and safetensors are read: no transformers, no
pickles.

Writing (``MoDTransformer.to_hf``): a model that is a plain Llama (no routed blocks, no experts,
SwiGLU) becomes a standard ``LlamaForCausalLM`` folder, or ``Qwen2ForCausalLM`` with query/key/value
biases, which transformers loads with no code of ours (``write_standard_folder``); any other model
becomes modlm's remote-code folder (``write_remote_code_folder``: this model package copied beside its
weights, loaded with ``trust_remote_code=True``).

The name mapping lives here only; the model's modules know nothing of transformers' names. To
support another architecture, add its ``model_type`` to ``ARCHITECTURES`` and what its config.json
says differently to ``config_from_hf`` (and its names to ``_hf_names``, if they differ).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from .chat_template import read_chat_template, write_chat_template
from .config import END_OF_TEXT_TOKENS, ROPE_SCALING_KEYS, TOKENIZER_FILE, ModelConfig
from .errors import UserError, first_line
from .version import folder_record

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""The ``model_type`` values modlm reads, and the one architecture class of each."""

ARCHITECTURE_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_size",
    "qkv_bias",
    "mlp",
    "mlp_hidden",
    "tie_embeddings",
    "rope_theta",
    "rope_scaling",
    "norm_eps",
)
"""The ``ModelConfig`` fields a checkpoint's config.json decides: the function its weights compute.
The rest (routing, capacity, context length, ...) is the caller's to choose."""

MAX_CONTEXT = 8192
"""The context an imported model gets unless ``max_seq_len`` says otherwise: the checkpoint's
``max_position_embeddings`` up to this (KV caches are allocated for ``max_seq_len`` tokens)."""

BEGIN_OF_TEXT_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>")
"""Start-of-text tokens a standard export names as ``bos_token_id`` when its tokenizer has one."""


class UnsupportedCheckpoint(UserError):
    """A transformers folder modlm cannot read: another architecture, a feature it lacks, no weights."""


# --- where a folder is -----------------------------------------------------------------------------
def is_hf_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a transformers ``config.json`` of a Llama-family model (not a modlm one)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in ARCHITECTURES
    except (ValueError, AttributeError):
        return False


def resolve(path_or_id: Union[str, Path]) -> Path:
    """The local folder of ``path_or_id``: a folder, or a Hub id (``OWNER/NAME`` or
    ``hub:OWNER/NAME``) found in the local Hugging Face cache or downloaded (its JSON and
    safetensors files only)."""
    spec = str(path_or_id)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UnsupportedCheckpoint(
            f"{spec} is a file: name the folder holding config.json and the safetensors weights"
        )
    if not (spec.startswith("hub:") or spec.count("/") == 1 and not spec.startswith((".", "/", "~"))):
        raise UnsupportedCheckpoint(f"pretrained model not found: {spec}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.removeprefix("hub:"), allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # noqa: BLE001 - offline, not found, gated: the user's to fix
        first = first_line(err)
        raise UnsupportedCheckpoint(
            f"pretrained model not found: {spec} is no local folder, and the Hub cannot give it ({first})"
        ) from None


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UnsupportedCheckpoint(f"{folder} has no config.json: not a transformers model folder")
    try:
        hf = json.loads(path.read_text())
    except ValueError as err:
        raise UnsupportedCheckpoint(f"{path} is not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise UnsupportedCheckpoint(f"{path} is not a transformers config (not a JSON object)")
    return hf


# --- config.json -> ModelConfig ------------------------------------------------------------------
def _rope(hf: dict) -> tuple[float, Optional[dict]]:
    """``rope_theta`` and ``rope_scaling`` of a config.json in either of transformers' layouts (4.x:
    ``rope_theta`` and ``rope_scaling``; 5.x: ``rope_parameters`` holding both)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise UnsupportedCheckpoint(f"unsupported: rope_parameters={params!r} (expected one mapping)")
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedCheckpoint("unsupported: rope_parameters per layer type (one RoPE for every layer only)")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedCheckpoint(
            "unsupported: "
            f"partial_rotary_factor={params.get('partial_rotary_factor', hf.get('partial_rotary_factor'))} "
            "(RoPE over the whole head only)"
        )
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise UnsupportedCheckpoint(f"unsupported: rope_type={kind!r} (modlm has plain RoPE and Llama 3's scaling)")
    scaling = {"rope_type": "llama3"}
    for key in ROPE_SCALING_KEYS[1:]:
        value = params.get(
            key, hf.get("max_position_embeddings") if key == "original_max_position_embeddings" else None
        )
        if value is None:
            raise UnsupportedCheckpoint(f"unsupported: rope_scaling without {key}")
        scaling[key] = value
    return float(theta), scaling


def _refuse(hf: dict, model_type: str, max_seq_len: int) -> None:
    """One line naming the first thing in ``hf`` modlm does not compute (beyond the model type)."""
    architectures = hf.get("architectures") or [ARCHITECTURES[model_type]]
    if list(architectures) != [ARCHITECTURES[model_type]]:
        raise UnsupportedCheckpoint(
            f"unsupported: architectures={architectures} (a {model_type} checkpoint is read as "
            f"{ARCHITECTURES[model_type]} only)"
        )
    checks = [
        ("hidden_act", hf.get("hidden_act", "silu"), lambda v: v == "silu", "SwiGLU MLPs with SiLU only"),
        ("mlp_bias", hf.get("mlp_bias", False), lambda v: not v, "MLPs without biases only"),
        ("quantization_config", hf.get("quantization_config"), lambda v: v is None, "unquantized weights only"),
        ("pretraining_tp", hf.get("pretraining_tp", 1), lambda v: v in (None, 1), "unsplit projections only"),
    ]
    for moe in ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok"):
        checks.append((moe, hf.get(moe), lambda v: not v, "dense MLPs only (a mixture of experts does not import)"))
    if model_type in ("llama", "mistral"):
        checks.append(
            (
                "attention_bias",
                hf.get("attention_bias", False),
                lambda v: not v,
                "no attention biases (Qwen2's query/key/value biases are read as a qwen2 model)",
            )
        )
    if model_type == "mistral":  # transformers' Mistral has a 4096-token window unless config.json says null
        checks.append(
            (
                "sliding_window",
                hf.get("sliding_window", 4096),
                lambda v: v is None or v >= max_seq_len,
                f"no sliding window shorter than the context ({max_seq_len} tokens)",
            )
        )
    if model_type == "qwen2":
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        checks.append(
            (
                "use_sliding_window",
                hf.get("use_sliding_window", False),
                lambda v: not v or window is None or window >= max_seq_len,
                f"no sliding window shorter than the context ({max_seq_len} tokens)",
            )
        )
        types = hf.get("layer_types") or []
        checks.append(
            (
                "layer_types",
                sorted(set(types)),
                lambda v: set(v) <= {"full_attention"} or window is None or window >= max_seq_len,
                "full attention in every layer",
            )
        )
    for field, value, ok, allowed in checks:
        if not ok(value):
            raise UnsupportedCheckpoint(f"unsupported: {field}={value!r} (modlm computes {allowed})")


def config_from_hf(hf: Mapping, **overrides) -> ModelConfig:
    """The ``ModelConfig`` of a transformers ``config.json`` (a mapping), with ``overrides``: any field
    but the ones the checkpoint decides (``ARCHITECTURE_FIELDS``), which may only be restated. Without
    ``route_every`` or ``route_layers`` the model is dense (``route_every=0``). With routed blocks and no
    ``router_weight`` given, the router weight is ``"2sigmoid"``: 1 at the zero
    routers an import starts with, so at capacity 1 the model computes the checkpoint's function."""
    hf = dict(hf)
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedCheckpoint(f"unsupported: model_type={model_type!r} (modlm reads {', '.join(ARCHITECTURES)})")
    context = int(hf.get("max_position_embeddings") or 2048)
    max_seq_len = overrides.get("max_seq_len") or min(context, MAX_CONTEXT)
    _refuse(hf, model_type, max_seq_len)
    try:
        d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        arch = {
            "vocab_size": int(hf["vocab_size"]),
            "d_model": d_model,
            "n_layers": int(hf["num_hidden_layers"]),
            "n_heads": n_heads,
            "mlp_hidden": int(hf["intermediate_size"]),
        }
    except KeyError as err:
        raise UnsupportedCheckpoint(f"config.json has no {err.args[0]}: not a complete {model_type} config") from None
    kv = hf.get("num_key_value_heads")
    head = hf.get("head_dim")
    theta, scaling = _rope(hf)
    arch.update(
        {
            "n_kv_heads": None if kv in (None, n_heads) else int(kv),
            "head_size": None if head is None or (d_model % n_heads == 0 and head == d_model // n_heads) else int(head),
            "qkv_bias": model_type == "qwen2",
            "mlp": "swiglu",
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "rope_theta": theta,
            "rope_scaling": scaling,
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        }
    )
    for field in ARCHITECTURE_FIELDS:
        if field in overrides and overrides[field] != arch[field]:
            raise UserError(
                f"{field}={overrides[field]!r} conflicts with the pretrained checkpoint's {field}={arch[field]!r}: "
                "its weights decide it"
            )
    for field in ("n_experts", "noop_experts"):
        if overrides.get(field):
            raise UserError(
                f"{field}={overrides[field]!r}: a pretrained dense checkpoint has one MLP per block, not experts"
            )
    if overrides.get("recursions", 1) != 1:
        raise UserError(
            f"recursions={overrides['recursions']!r}: a pretrained checkpoint's blocks each have their own "
            "weights; converting them to a shared stack is not supported"
        )
    values = {"route_every": 0, **overrides, **arch, "max_seq_len": max_seq_len}  # dense unless routing is asked for
    routed = ModelConfig(**{**values, "router_weight": values.get("router_weight", "sigmoid")}).routed_layers
    if routed and "router_weight" not in overrides:
        values["router_weight"] = "2sigmoid"
    return ModelConfig(**values)


def architecture_of(folder: Path) -> dict:
    """The ``ARCHITECTURE_FIELDS`` values of a transformers folder (what a run from it must keep)."""
    cfg = config_from_hf(read_config(folder), route_every=0)
    return {field: getattr(cfg, field) for field in ARCHITECTURE_FIELDS}


# --- weights ----------------------------------------------------------------------------------------
def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's ``model.safetensors`` (or of the shards its
    ``model.safetensors.index.json`` lists)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        extra = f" ({', '.join(found)}: pickled weights are never read; save with safe_serialization)" if found else ""
        raise UnsupportedCheckpoint(
            f"{folder} holds no weights: expected model.safetensors or model.safetensors.index.json{extra}"
        )
    tensors = {}
    for path in files:
        if not path.is_file():
            raise UnsupportedCheckpoint(f"{path} is listed in model.safetensors.index.json but missing")
        tensors.update(load_file(str(path)))
    return tensors


def _prefix(cfg: ModelConfig, layer: int) -> str:
    return f"blocks.{layer}.block." if cfg.is_routed(layer) else f"blocks.{layer}."


def _hf_names(layer: int) -> dict[str, str]:
    """transformers' names of one decoder layer's tensors, by modlm's (relative to the block)."""
    at = f"model.layers.{layer}."
    return {
        "attn_norm.weight": at + "input_layernorm.weight",
        "mlp_norm.weight": at + "post_attention_layernorm.weight",
        "attn.proj.weight": at + "self_attn.o_proj.weight",
        "mlp.gate.weight": at + "mlp.gate_proj.weight",
        "mlp.up.weight": at + "mlp.up_proj.weight",
        "mlp.down.weight": at + "mlp.down_proj.weight",
    }


def state_dict_from_hf(hf: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """modlm's names and layout for a Llama-family checkpoint's tensors: query, key and value
    projections fused into one (``attn.qkv``), routed blocks' tensors under ``.block``. Routers and
    predictors are not in a checkpoint: the caller keeps its own (``load_hf`` zeroes the routers)."""
    hf = dict(hf)
    out, used = {}, set()

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise UnsupportedCheckpoint(f"the checkpoint has no {name} (a {cfg.n_layers}-layer model needs it)")
        used.add(name)
        return hf[name]

    out["embed.weight"] = take("model.embed_tokens.weight")
    out["norm.weight"] = take("model.norm.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    elif "lm_head.weight" in hf:  # some tied checkpoints store the shared matrix twice
        used.add("lm_head.weight")
    for layer in range(cfg.n_layers):
        prefix, at = _prefix(cfg, layer), f"model.layers.{layer}.self_attn."
        for ours, theirs in _hf_names(layer).items():
            out[prefix + ours] = take(theirs)
        out[prefix + "attn.qkv.weight"] = torch.cat([take(at + f"{p}_proj.weight") for p in "qkv"])
        if cfg.qkv_bias:
            out[prefix + "attn.qkv.bias"] = torch.cat([take(at + f"{p}_proj.bias") for p in "qkv"])
    left = sorted(name for name in set(hf) - used if not name.endswith("rotary_emb.inv_freq"))
    if left:
        raise UnsupportedCheckpoint(
            f"unsupported: the checkpoint has tensors modlm has no place for ({', '.join(left[:3])}"
            f"{', ...' if len(left) > 3 else ''})"
        )
    return out


def state_dict_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' names and layout of a dense modlm model's tensors (the inverse of
    ``state_dict_from_hf``); contiguous copies, as safetensors wants them."""
    widths = [cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for layer in range(cfg.n_layers):
        prefix, at = _prefix(cfg, layer), f"model.layers.{layer}.self_attn."
        for ours, theirs in _hf_names(layer).items():
            out[theirs] = state[prefix + ours]
        for p, part in zip("qkv", state[prefix + "attn.qkv.weight"].split(widths)):
            out[at + f"{p}_proj.weight"] = part
        if cfg.qkv_bias:
            for p, part in zip("qkv", state[prefix + "attn.qkv.bias"].split(widths)):
                out[at + f"{p}_proj.bias"] = part
    return {name: t.detach().contiguous().clone() for name, t in out.items()}


def load_hf(cls, path_or_id, **overrides):
    """``cls`` (``MoDTransformer``) built from a Llama-family folder or Hub id: its architecture,
    its weights (in the model's fp32, whatever dtype they were saved in), every router at zero,
    predictors as a new model starts them, its ``tokenizer.json`` and chat template when it has them; in
    eval mode."""
    folder = resolve(path_or_id)
    cfg = config_from_hf(read_config(folder), **overrides)
    weights = read_weights(folder)
    model = cls(cfg)
    state = model.state_dict()
    loaded = state_dict_from_hf(weights, cfg)
    for name, tensor in loaded.items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise UnsupportedCheckpoint(
                f"{name}: the checkpoint's {tuple(tensor.shape)} does not fit its config.json "
                f"({tuple(state[name].shape)})"
            )
    for layer in cfg.routed_layers:
        loaded[f"blocks.{layer}.router.weight"] = torch.zeros_like(state[f"blocks.{layer}.router.weight"])
    missing = [
        name
        for name in state
        if name not in loaded
        and ".predictor." not in name
        and ".decision." not in name
        and not (cfg.tie_embeddings and name == "lm_head.weight")
    ]
    if missing:  # a bug here, not the user's: every tensor but the predictors and decisions comes from the checkpoint
        raise RuntimeError(f"from_hf left tensors unset: {missing[:3]}")
    model.load_state_dict(loaded, strict=False)
    tokenizer = folder / TOKENIZER_FILE
    if tokenizer.is_file():
        model.tokenizer_json = tokenizer.read_text(encoding="utf-8")
    model.chat_template = read_chat_template(folder)
    return model.eval()


# --- writing ----------------------------------------------------------------------------------------
MODEL_PACKAGE = Path(__file__).resolve().parent
"""The folder whose files are a remote-code export's code: this package."""
AUTO_MAP = {
    "AutoConfig": "configuration_modlm.ModLMConfig",
    "AutoModelForCausalLM": "modeling_modlm.ModLMForCausalLM",
}


def is_standard(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` is a plain Llama (or Qwen2, with query/key/value biases) that transformers
    runs with its own code: no routed blocks, no experts, no recursion, SwiGLU MLPs."""
    return not cfg.routed_layers and not cfg.expert_layers and not cfg.recursive and cfg.mlp == "swiglu"


def token_ids(tokenizer_json: str) -> dict[str, int]:
    """Token -> id of a ``tokenizer.json``'s added tokens and (for vocabularies stored as a
    mapping: BPE, WordPiece) its model's vocabulary."""
    data = json.loads(tokenizer_json)
    vocab = (data.get("model") or {}).get("vocab")
    ids = dict(vocab) if isinstance(vocab, dict) else {}
    ids.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
    return ids


def special_tokens(tokenizer_json: str) -> tuple[str, int, Optional[str], Optional[int]]:
    """``(eos, eos_id, bos, bos_id)`` of a tokenizer: its end-of-text token (the first of
    ``END_OF_TEXT_TOKENS`` it has; a UserError without one) and start-of-text token (None without)."""
    ids = token_ids(tokenizer_json)
    eos = next((t for t in END_OF_TEXT_TOKENS if t in ids), None)
    if eos is None:
        raise UserError(f"the tokenizer has no end-of-text token (looked for {', '.join(END_OF_TEXT_TOKENS)})")
    bos = next((t for t in BEGIN_OF_TEXT_TOKENS if t in ids), None)
    return eos, ids[eos], bos, None if bos is None else ids[bos]


def tokenizer_text(tokenizer) -> str:
    """A ``tokenizer.json``'s text from a ``tokenizers.Tokenizer``, a ``tokenizer.json`` file or a
    folder holding one."""
    if hasattr(tokenizer, "to_str"):
        return tokenizer.to_str()
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(
            f"tokenizer {str(tokenizer)!r} does not exist (expected a tokenizer.json or a folder holding one)"
        )
    return path.read_text(encoding="utf-8")


def template_tokens(tokenizer_json: str) -> dict[str, str]:
    """The special tokens a chat template sees (``{{ eos_token }}``, ``{{ bos_token }}``, ...), as
    transformers passes them: those ``tokenizer_config`` names, derived from the tokenizer alone (its
    end-of-text token is ``eos_token`` and ``pad_token``, its start-of-text token, if any, ``bos_token``),
    so that modlm and transformers render a conversation alike."""
    eos, _, bos, _ = special_tokens(tokenizer_json)
    return {"eos_token": eos, "pad_token": eos, **({"bos_token": bos} if bos is not None else {})}


def tokenizer_config(config: ModelConfig, eos_token: str, bos_token: Optional[str] = None, chat: bool = False) -> dict:
    """``tokenizer_config.json``: the fast tokenizer over ``tokenizer.json``. ``split_special_tokens``
    makes ``<|endoftext|>`` typed in text ordinary text, as in training (modlm's tokenizer sets
    ``encode_special_tokens``); the separator itself is ``eos_token``. A model with a chat template
    (``chat``) keeps special tokens whole instead: its template writes them as text (the end of a turn),
    and transformers tokenizes the rendered conversation as modlm does, special tokens recognised.
    Prompts of a batch are padded on the left, where transformers' generation wants them."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        "pad_token": eos_token,
        "bos_token": bos_token,
        "unk_token": None,
        "split_special_tokens": not chat,
        "padding_side": "left",
        "model_max_length": config.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }


def transformers_config(config: ModelConfig, eos_id: int, dtype: torch.dtype) -> dict:
    """The keys transformers reads from a remote-code folder's ``config.json`` beside the
    ``ModelConfig`` fields."""
    return {
        "model_type": "modlm",
        "architectures": ["ModLMForCausalLM"],
        "auto_map": AUTO_MAP,
        "tie_word_embeddings": config.tie_embeddings,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


def standard_config(config: ModelConfig, eos_id: int, bos_id: Optional[int], dtype: torch.dtype) -> dict:
    """A standard ``config.json`` of a dense model: ``LlamaForCausalLM``'s, or ``Qwen2ForCausalLM``'s
    with query/key/value biases. RoPE is written as transformers 5 reads it (``rope_parameters``,
    Llama 3's scaling in it), and its base also as ``rope_theta``, where older readers look."""
    if not is_standard(config):
        raise UserError("only a dense SwiGLU model without experts exports as a standard transformers model")
    qwen = config.qkv_bias
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {**config.rope_scaling, "rope_theta": config.rope_theta}
    out = {
        "architectures": [ARCHITECTURES["qwen2" if qwen else "llama"]],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if qwen:
        out.update(
            {
                "use_sliding_window": False,
                "sliding_window": None,
                "max_window_layers": config.n_layers,
                "layer_types": ["full_attention"] * config.n_layers,
            }
        )
    else:
        out.update({"attention_bias": False, "mlp_bias": False})
    return out


def dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def remote_code_files(package: Path = MODEL_PACKAGE) -> list[str]:
    """Every module of the model package (``__init__.py`` aside), sorted."""
    return sorted(p.name for p in package.glob("*.py") if p.name != "__init__.py")


def write_transformers_files(
    folder: Path, config: ModelConfig, eos_token: str, eos_id: int, chat: bool = False
) -> None:
    """Write the remote code, ``tokenizer_config.json`` and ``generation_config.json`` into ``folder``
    (``config.json``, ``model.safetensors``, ``tokenizer.json`` and the chat template are the model's and
    tokenizer's own)."""
    for name in remote_code_files():
        shutil.copyfile(MODEL_PACKAGE / name, folder / name)
    dump(folder / "tokenizer_config.json", tokenizer_config(config, eos_token, chat=chat))
    dump(folder / "generation_config.json", {"eos_token_id": eos_id, "pad_token_id": eos_id})


STANDARD_CARD = """---
library_name: transformers
tags:
- modlm
---

A {architecture} trained with modlm: `AutoModelForCausalLM.from_pretrained(FOLDER_OR_REPO)` and
`AutoTokenizer.from_pretrained(FOLDER_OR_REPO)` (no remote code); in modlm,
`MoDTransformer.from_hf(FOLDER_OR_REPO)` or `modlm-generate FOLDER_OR_REPO "a prompt"`.
{details}"""


def write_standard_folder(model, folder: Path, tokenizer_json: str, card: str = "") -> None:
    """A dense model as a standard transformers folder: ``config.json``, ``model.safetensors`` (in
    transformers' names), its tokenizer (``tokenizer.json``, ``tokenizer_config.json``, its chat template
    when it has one), ``generation_config.json`` and a model card."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    eos, eos_id, bos, bos_id = special_tokens(tokenizer_json)
    dtype = model.embed.weight.dtype
    config = {**standard_config(cfg, eos_id, bos_id, dtype), **folder_record()}  # transformers keeps other keys
    save_file(state_dict_to_hf(model.state_dict(), cfg), str(folder / "model.safetensors"), metadata={"format": "pt"})
    dump(folder / "config.json", config)
    (folder / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    dump(folder / "tokenizer_config.json", tokenizer_config(cfg, eos, bos, chat=model.chat_template is not None))
    write_chat_template(folder, model.chat_template)
    generation = {"eos_token_id": eos_id, "pad_token_id": eos_id}
    if bos_id is not None:
        generation["bos_token_id"] = bos_id
    dump(folder / "generation_config.json", generation)
    (folder / "README.md").write_text(STANDARD_CARD.format(architecture=config["architectures"][0], details=card))


def write_remote_code_folder(model, folder: Path, tokenizer_json: str, card: str = "") -> None:
    """Any model as modlm's remote-code folder: ``save_pretrained`` (safetensors, ``config.json`` of
    the ``ModelConfig`` fields and transformers' keys, ``tokenizer.json``, the chat template, a model card
    with ``card`` in it), this package's source and transformers' tokenizer and generation files."""
    folder = Path(folder)
    eos, eos_id, _, _ = special_tokens(tokenizer_json)
    config = {**model.config.to_dict(), **transformers_config(model.config, eos_id, model.embed.weight.dtype)}
    (folder / "README.md").unlink(missing_ok=True)  # save_pretrained keeps an existing card
    model.tokenizer_json = tokenizer_json
    model.save_pretrained(folder, config=config, model_card_kwargs={"details": card})
    write_transformers_files(folder, model.config, eos, eos_id, chat=model.chat_template is not None)


def write_folder(model, folder: Path, tokenizer=None, card: str = "") -> str:
    """``model.to_hf``: the standard folder for a plain Llama/Qwen2, the remote-code one otherwise;
    returns which (``"standard"`` or ``"remote-code"``). ``tokenizer``: a ``tokenizers.Tokenizer``,
    a ``tokenizer.json`` or a folder holding one; default the model's own ``tokenizer_json``."""
    if tokenizer is None and model.tokenizer_json is None:
        raise UserError("to_hf needs the model's tokenizer: pass tokenizer= (a tokenizer.json, a folder, a Tokenizer)")
    text = model.tokenizer_json if tokenizer is None else tokenizer_text(tokenizer)
    if is_standard(model.config):
        write_standard_folder(model, folder, text, card)
        return "standard"
    write_remote_code_folder(model, folder, text, card)
    return "remote-code"


def upload_folder(folder, repo_id: str, private: bool = False) -> str:
    """Upload ``folder`` (an export, or what ``push_to_hub`` wrote) to the Hugging Face Hub repository
    ``repo_id`` (made if it does not exist); the commit's URL. The one way modlm uploads."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="modlm export"))
    except Exception as err:  # noqa: BLE001 - offline, no token, no rights: the user's to fix
        raise UserError(f"cannot push {folder} to the Hub repository {repo_id}: {first_line(err)}") from None
