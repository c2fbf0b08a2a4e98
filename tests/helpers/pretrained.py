"""Pretrained Llama-family models made here: transformers' own ``LlamaForCausalLM``,
``MistralForCausalLM`` and ``Qwen2ForCausalLM`` at a small size with random weights, saved with
``save_pretrained`` (safetensors) beside a byte-level BPE tokenizer, as a downloaded model's folder
looks. No network: what a Hub id would give is laid out as the local Hugging Face cache holds it
(``cache_repo``)."""

from __future__ import annotations

import json
from pathlib import Path

SMALL = dict(
    vocab_size=416,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=256,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
)
"""A small shape; the weights' spread (0.1) is larger than transformers' default so that attention is
far from uniform and the logits vary (a parity test of near-constant logits would prove little)."""
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
"""Llama 3's RoPE scaling with a short original context, so that 16-100 token inputs reach the
rescaled frequencies."""

KINDS = {
    "llama-mha-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-gqa-untied": ("llama", dict(num_key_value_heads=2)),
    "llama3-rope": ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "llama-head-dim": ("llama", dict(num_key_value_heads=1, head_dim=32)),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2)),
}
"""The checkpoints the parity tests read: Llama with and without grouped-query attention, tied and
untied, with Llama 3's RoPE scaling and with heads wider than ``hidden_size / heads``; Mistral; Qwen2
(query/key/value biases)."""


def hf_model(kind: str, seed: int = 0, **changes):
    """transformers' model of ``kind`` (a ``KINDS`` key, or ``llama``/``mistral``/``qwen2``), in eval mode."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    family, extra = KINDS.get(kind, (kind, {}))
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SMALL, **extra, **changes}))
    if family == "qwen2":  # transformers starts biases at 0: give them values, or they would test nothing
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1)
    return model.eval()


def tokenizer_folder(folder: Path, corpus: str, vocab_size: int = 400) -> Path:
    """A tokenizer folder as transformers writes one (tokenizer.json + tokenizer_config.json): a
    byte-level BPE whose end-of-text token is ``</s>`` (start of text ``<s>``), no ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((p.read_text() for p in sorted(Path(corpus).glob("*.py"))[:20]), trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return folder


def pretrained_folder(folder: Path, kind: str = "llama-gqa-untied", corpus: str | None = None, **changes) -> Path:
    """``hf_model(kind)`` saved to ``folder`` with ``save_pretrained`` (and, given a corpus, a
    tokenizer of 400 tokens: the model's 416 are more, as checkpoints often have)."""
    hf_model(kind, **changes).save_pretrained(folder)
    if corpus is not None:
        tokenizer_folder(folder, corpus)
    return folder


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay ``files`` out as the local Hugging Face cache holds a downloaded model repository."""
    commit = "1" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
