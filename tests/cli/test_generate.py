"""modlm-generate on a real tiny run's checkpoint: prompts from the command line, a file and
standard input, streaming, samples, stop strings, top-k routing, an export folder, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import modlm
from modlm.cli.eval import main as eval_main
from modlm.cli.generate import main as generate_main
from modlm.cli.train import main as train_main
from tests.helpers import REPO, tiny_args

SAMPLE = ["--max_new_tokens", "12", "--temperature", "1.0", "--top_k", "null", "--seed", "7"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("generate")
    assert (
        train_main(
            ["fit", *tiny_args(root, tiny_tokenizer, "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0")]
        )
        == 0
    )
    return root / "checkpoints" / "last.ckpt"


def generate(capsys, *argv) -> tuple[int, str, str]:
    code = generate_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_one_prompt_streams_its_continuation(checkpoint, capsys):
    code, out, _ = generate(
        capsys, checkpoint, "def f(", "--max_new_tokens", "12", "--temperature", "1.0", "--seed", "7"
    )
    assert code == 0 and out.startswith("def f(") and len(out) > len("def f(\n")
    again = generate(capsys, checkpoint, "def f(", "--max_new_tokens", "12", "--temperature", "1.0", "--seed", "7")[1]
    other = generate(capsys, checkpoint, "def f(", "--max_new_tokens", "12", "--temperature", "1.0", "--seed", "8")[1]
    assert again == out and other != out  # the seed decides the sample


def test_prompts_from_the_command_line_and_a_file_give_the_same_samples(checkpoint, tmp_path, capsys):
    code, out, _ = generate(capsys, checkpoint, "import os", "class A:", "--num_samples", "2", *SAMPLE)
    parts = out.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert code == 0 and len(parts) == 4
    assert [p.startswith(prompt) for p, prompt in zip(parts, ["import os", "import os", "class A:", "class A:"])] == [
        True
    ] * 4
    assert parts[0] != parts[1]  # two samples of one prompt
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n\nclass A:\n")  # blank lines are not prompts
    assert generate(capsys, checkpoint, "--prompt_file", prompts, "--num_samples", "2", *SAMPLE)[1] == out


def test_a_stop_string_ends_the_continuation_before_it(checkpoint, capsys):
    free = generate(capsys, checkpoint, "def f(", "--max_new_tokens", "20", "--temperature", "1.0", "--seed", "3")[1]
    continuation = free.rstrip("\n")[len("def f(") :]
    assert len(continuation) > 6, "the test needs a continuation to cut"
    stop = continuation[3:6]
    cut = generate(
        capsys, checkpoint, "def f(", "--max_new_tokens", "20", "--temperature", "1.0", "--seed", "3", "--stop", stop
    )[1]
    assert cut == "def f(" + continuation[: continuation.find(stop)] + "\n"


def test_topk_routing_generates_too_and_the_version_is_shown(checkpoint, capsys):
    code, out, err = generate(
        capsys, checkpoint, "def f(", "--max_new_tokens", "6", "--temperature", "0", "--routing", "topk"
    )
    assert code == 0 and out.startswith("def f(")
    assert err.strip().splitlines()[-1] == f"modlm {modlm.__version__}; the model written by modlm {modlm.__version__}"


@pytest.mark.slow
def test_standard_input_and_interactive_mode(checkpoint):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "modlm.cli.generate", str(checkpoint), "--max_new_tokens", "4", "--temperature", "0"]
    piped = subprocess.run(cmd, input="import os\nclass A:\n", capture_output=True, text=True, env=env, timeout=120)
    assert piped.returncode == 0, piped.stderr
    first, second = piped.stdout.split("-" * 40 + "\n")  # two prompts, two continuations
    assert first.startswith("import os") and second.startswith("class A:")
    talk = subprocess.run(
        cmd + ["--interactive"], input="import os\nclass A:\n", capture_output=True, text=True, env=env, timeout=120
    )
    assert talk.returncode == 0, talk.stderr
    assert "no chat template" in talk.stderr
    lines = talk.stdout.split("\n")
    assert lines[0].startswith("> import os") and lines[1].startswith("> class A:")


@pytest.mark.slow
def test_an_export_folder_generates_like_its_checkpoint(checkpoint, tmp_path, capsys):
    export = tmp_path / "export"
    assert (
        eval_main([str(checkpoint), "--export", str(export), "--quiet", "--decode_tokens", "2", "--prompt_tokens", "2"])
        == 0
    )
    capsys.readouterr()
    want = generate(capsys, checkpoint, "def f(", *SAMPLE)[1]
    assert generate(capsys, export, "def f(", *SAMPLE)[1] == want


def test_bad_input_is_one_line_and_status_2(checkpoint, tmp_path, capsys):
    old = tmp_path / "old.ckpt"
    ckpt = torch.load(checkpoint, weights_only=True)
    for key in ("tokenizer", "validation_windows"):  # as an older modlm wrote it
        ckpt.pop(key)
    torch.save(ckpt, old)
    cases = {
        "carries no tokenizer": [old, "x"],
        "exceeds max_seq_len": [checkpoint, "x " * 200],
        "checkpoint not found": ["nobody/no-such-model", "x"],  # offline: not in the local Hub cache either
        "cannot read --prompt_file": [checkpoint, "--prompt_file", tmp_path / "missing.txt"],
    }
    for message, argv in cases.items():
        code, out, err = generate(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (
            message,
            err,
        )


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_tokenizer):
    """A saved model whose tokenizer has ChatML's tokens and template (its end of turn, ``<|im_end|>``, is not
    its end of text), with weights spread enough (init_std 0.3) that greedy answers vary, and whose answer to
    QUESTION ends after 3 tokens: the end of turn's output row is made the 4th token's (a tie, which greedy
    decoding breaks toward the end of turn's lower id)."""
    from modlm import ModelConfig, MoDTransformer
    from modlm.data.chat import ChatEncoder
    from modlm.model.chat_template import read_chat_template
    from tests.helpers.chat import chatml_tokenizer_folder

    folder = chatml_tokenizer_folder(tmp_path_factory.mktemp("chat") / "model", tiny_tokenizer[0])
    torch.manual_seed(0)
    model = MoDTransformer(
        ModelConfig(
            vocab_size=400, d_model=32, n_layers=2, n_heads=2, max_seq_len=256, init_std=0.3, tie_embeddings=False
        )
    ).eval()
    model.tokenizer_json, model.chat_template = (folder / "tokenizer.json").read_text(), read_chat_template(folder)
    encoder = ChatEncoder(model.tokenizer_json, model.chat_template)
    ids = encoder.encode(QUESTION, add_generation_prompt=True)[0]
    fourth = int(model.generate([ids], 4, temperature=0)[0][-1])
    assert fourth > encoder.end_of_turn_id
    with torch.no_grad():
        model.lm_head.weight[encoder.end_of_turn_id] = model.lm_head.weight[fourth]
    model.save_pretrained(folder)
    return folder


QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tuple?"}]


def reference_answer(folder, messages, new_tokens: int, stop: str = "<|im_end|>") -> str:
    """What greedy decoding answers to ``messages`` rendered with the model's template, up to ``stop``."""
    from modlm.data.chat import ChatEncoder
    from modlm.saved import load_saved

    saved = load_saved(str(folder))
    encoder = ChatEncoder(saved.tokenizer.to_str(), saved.chat_template)
    ids = encoder.encode(messages, add_generation_prompt=True)[0]
    stop_id = saved.tokenizer.token_to_id(stop)
    out = saved.model.generate([ids], new_tokens, temperature=0, eot_id=stop_id)[0][len(ids) :].tolist()
    return saved.tokenizer.decode([t for t in out if t != stop_id])


def test_chat_answers_a_message_rendered_with_the_models_template(chat_model, capsys):
    want = reference_answer(chat_model, QUESTION, 12)
    code, out, err = generate(
        capsys,
        chat_model,
        "What is a tuple?",
        "--chat",
        "--system",
        "Be brief.",
        "--max_new_tokens",
        "12",
        "--temperature",
        "0",
    )
    assert code == 0 and out == want + "\n" and want.strip() and "no chat template" not in err
    unstopped = reference_answer(chat_model, QUESTION, 12, stop="<|endoftext|>")
    assert unstopped.startswith(want) and len(unstopped) > len(want)  # it ended at the end of turn
    plain = generate(capsys, chat_model, "What is a tuple?", "--max_new_tokens", "12", "--temperature", "0")[1]
    assert plain.startswith("What is a tuple?") and plain != out


def test_an_interactive_chat_remembers_the_conversation(chat_model, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("What is a tuple?\nAnd a list?\n"))
    code, out, err = generate(
        capsys, chat_model, "--chat", "--interactive", "--max_new_tokens", "10", "--temperature", "0"
    )
    first = reference_answer(chat_model, [{"role": "user", "content": "What is a tuple?"}], 10)
    second = reference_answer(
        chat_model,
        [
            {"role": "user", "content": "What is a tuple?"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And a list?"},
        ],
        10,
    )
    alone = reference_answer(chat_model, [{"role": "user", "content": "And a list?"}], 10)
    assert code == 0 and out == f"> {first}\n> {second}\n> " and second != alone
    assert "Each line is your message" in err
