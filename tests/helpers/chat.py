"""Chat pieces the tests share: conversations, a ChatML tokenizer and template as chat models ship them, and
chat files of question/answer pairs from real text (the standard library's docstrings)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The ChatML template (Qwen, SmolLM2-Instruct): its end of turn, ``<|im_end|>``, is not the end of text."""

CONVERSATION = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "What does `textwrap.dedent` do?"},
    {"role": "assistant", "content": "Remove any common leading whitespace from every line in text."},
    {"role": "user", "content": "And `textwrap.indent`?"},
    {"role": "assistant", "content": "Adds 'prefix' to the beginning of selected lines in 'text'."},
]


def chatml_tokenizer_folder(folder: Path, corpus: str, vocab_size: int = 400) -> Path:
    """A byte-level BPE with ``<|endoftext|>``, ``<|im_start|>`` and ``<|im_end|>`` as special tokens, saved
    as a transformers tokenizer folder with the ChatML template in ``tokenizer_config.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((p.read_text() for p in sorted(Path(corpus).glob("*.py"))[:20]), trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def docstring_pairs(modules=("textwrap", "json", "shlex", "string", "fnmatch", "glob", "base64", "html")) -> list[dict]:
    """``{"prompt": "What does `mod.name` do?", "completion": the first paragraph of its docstring}`` for the
    public functions of some standard-library modules: real text nobody here wrote."""
    import importlib

    pairs = []
    for name in modules:
        module = importlib.import_module(name)
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or not inspect.isfunction(value) or value.__module__ != module.__name__:
                continue
            doc = inspect.getdoc(value)
            if doc:
                answer = doc.split("\n\n")[0].strip()
                pairs.append({"prompt": f"What does `{name}.{attr}` do?", "completion": answer})
    return pairs


def write_chats(path: Path, records: list) -> Path:
    """One JSON line per record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def as_messages(pair: dict) -> dict:
    return {
        "messages": [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["completion"]}]
    }
