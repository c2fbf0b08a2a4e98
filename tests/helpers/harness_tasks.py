"""lm-evaluation-harness tasks made here from the Python standard library's source (the Hub's data is
out of reach offline): JSON files of documents and the YAML task files that read them
(``dataset_path: json``), one task per kind of request:

* ``docstring_mc`` (multiple choice, ``acc``/``acc_norm``): ``# <a function's docstring line>\\ndef``,
  which of four function names of the same module follows;
* ``stdlib_ppl`` (rolling log-likelihood, ``word_perplexity``/``byte_perplexity``/``bits_per_byte``):
  whole stretches of stdlib source;
* ``docstring_gen`` (generate until ``(`` or a newline, ``exact_match``): the same prompt, the
  function's name generated.

Two more, for ``bench/harness.py`` (which writes them all, larger): ``next_line`` (multiple choice:
six lines of a module, which of four of its lines follows) and ``line_end`` (generate the rest of a
line from the six lines before it and its first half, ``exact_match`` and ``chrf``, the character
n-gram F-score, which credits a partly right completion).
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TASKS = ("docstring_mc", "stdlib_ppl", "docstring_gen")
LINE_TASKS = ("next_line", "line_end")


def functions(path: Path) -> list[tuple[str, str]]:
    """``(name, first docstring line)`` of a module's public functions and methods (classes' too) that
    have one."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return []
    found = []
    nodes = list(tree.body) + [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
    for node in nodes:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            doc = (ast.get_docstring(node) or "").strip().splitlines()
            if doc and 10 <= len(doc[0]) <= 120:
                found.append((node.name, doc[0].strip()))
    return found


def first_modules(n: int = 30) -> list[Path]:
    """The first ``n`` top-level stdlib modules, in name order."""
    return sorted(STDLIB.glob("*.py"))[:n]


def docstring_questions(n: int, paths: list[Path], seed: int = 0) -> list[dict]:
    """Up to ``n`` questions ``{"doc", "name", "choices", "answer"}`` from the modules ``paths``: the
    answer among its module's other function names (three distractors), in a seeded random order."""
    rng = random.Random(seed)
    questions = []
    for path in paths:
        found = functions(path)
        names = sorted({name for name, _ in found})
        if len(names) < 4:
            continue
        for name, doc in dict(found).items():  # a name once (methods of several classes share names)
            choices = rng.sample([other for other in names if other != name], 3) + [name]
            rng.shuffle(choices)
            questions.append({"doc": doc, "name": name, "choices": choices, "answer": choices.index(name)})
    rng.shuffle(questions)
    return questions[:n]


def source_stretches(n: int, chars: int, paths: list[Path]) -> list[dict]:
    """Up to ``n`` stretches ``{"text"}`` of ``chars`` characters, the start of one module of ``paths`` each."""
    texts = []
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= chars:
            texts.append({"text": text[:chars]})
        if len(texts) == n:
            break
    return texts


def line_questions(n: int, paths: list[Path], seed: int = 0, before: int = 6) -> list[dict]:
    """Up to ``n`` questions ``{"context", "line", "choices", "answer", "head", "tail"}``: the ``before``
    lines above a line of code (20-80 characters, not a comment), that line among three other such
    lines of the module (none of them in the context), and the line cut after a space near its middle
    (``head``, ``tail``)."""
    rng = random.Random(seed)
    questions = []
    for path in paths:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        usable = [
            i
            for i, line in enumerate(lines)
            if i >= before and 20 <= len(line.strip()) <= 80 and not line.strip().startswith("#")
        ]
        texts = sorted({lines[i] for i in usable})
        if len(texts) < 8:
            continue
        for i in rng.sample(usable, min(len(usable), 8)):
            line, cut = lines[i], lines[i].rfind(" ", 0, len(lines[i]) // 2 + 1)
            indent = len(line) - len(line.lstrip())
            if cut <= indent:
                continue
            seen = set(lines[i - before : i + 1])  # no distractor the context already shows
            choices = rng.sample([t for t in texts if t not in seen], 3) + [line]
            rng.shuffle(choices)
            questions.append(
                {
                    "context": "\n".join(lines[i - before : i]) + "\n",
                    "line": line,
                    "choices": choices,
                    "answer": choices.index(line),
                    "head": line[: cut + 1],
                    "tail": line[cut + 1 :],
                }
            )
    rng.shuffle(questions)
    return questions[:n]


YAML = {
    "docstring_mc": """task: docstring_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "# {{{{doc}}}}\\ndef"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""",
    "stdlib_ppl": """task: stdlib_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""",
    "docstring_gen": """task: docstring_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: generate_until
doc_to_text: "# {{{{doc}}}}\\ndef"
doc_to_target: "{{{{name}}}}"
generation_kwargs:
  until: ["(", "\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: [" "]
""",
    "next_line": """task: next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
target_delimiter: ""
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""",
    "line_end": """task: line_end
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}{{{{head}}}}"
target_delimiter: ""
doc_to_target: "{{{{tail}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: chrf
    aggregation: chrf
    higher_is_better: true
""",
}


def harness_tokenizer(vocab_size: int = 400):
    """A byte-level BPE as modlm trains one (an end-of-text token, no start-of-text), on 30 stdlib
    modules; built with ``tokenizers`` alone, which is quicker to import than modlm's data layer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((p.read_text()[:10_000] for p in first_modules()), trainer=trainer)
    return tok


def harness_model(routed: bool, seed: int = 0, max_seq_len: int = 48, **changes):
    """A small ``MoDTransformer`` (every other block routed at capacity 0.5, or dense) of random
    weights with a large spread (0.2): its predictions vary from token to token and its greedy text is
    not one token repeated, so what is scored and generated tells models and routings apart."""
    import torch

    from modlm.model import ModelConfig
    from modlm.model.transformer import MoDTransformer

    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=400,
        d_model=64,
        n_layers=4,
        n_heads=4,
        max_seq_len=max_seq_len,
        init_std=0.2,
        route_every=2 if routed else 0,
        capacity=0.5,
        **changes,
    )
    return MoDTransformer(config).eval()


def write_tasks(
    folder: Path,
    questions: int = 8,
    stretches: int = 3,
    chars: int = 600,
    max_gen_toks: int = 8,
    seed: int = 0,
    paths: list[Path] | None = None,
    lines: bool = False,
) -> Path:
    """The three tasks' data and YAML files in ``folder`` (an ``--include_path``), drawn from the
    modules ``paths`` (default ``first_modules()``), and with ``lines`` the two line tasks; returns
    the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = first_modules() if paths is None else paths
    data = {
        "docstring_mc": docstring_questions(questions, paths, seed),
        "stdlib_ppl": source_stretches(stretches, chars, paths),
    }
    data["docstring_gen"] = data["docstring_mc"]
    if lines:
        data["next_line"] = data["line_end"] = line_questions(questions, paths, seed)
    for task, rows in data.items():
        path = folder / f"{task}.json"
        path.write_text(json.dumps(rows, indent=1))
        (folder / f"{task}.yaml").write_text(YAML[task].format(data=path, max_gen_toks=max_gen_toks))
    return folder
