"""modlm-generate on a real tiny run's checkpoint: prompts from the command line, a file and
standard input, streaming, samples, stop strings, top-k routing, an export folder, and bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from modlm.cli.eval import main as eval_main
from modlm.cli.generate import main as generate_main
from modlm.cli.train import main as train_main
from tests.helpers import REPO, tiny_args

SAMPLE = ["--max_new_tokens", "12", "--temperature", "1.0", "--top_k", "null", "--seed", "7"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("generate")
    assert train_main(["fit", *tiny_args(root, tiny_tokenizer, "--trainer.max_steps", "4",
                                         "--trainer.limit_val_batches", "0")]) == 0
    return root / "checkpoints" / "last.ckpt"


def generate(capsys, *argv) -> tuple[int, str, str]:
    code = generate_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_one_prompt_streams_its_continuation(checkpoint, capsys):
    code, out, _ = generate(capsys, checkpoint, "def f(", "--max_new_tokens", "12", "--temperature", "1.0", "--seed", "7")
    assert code == 0 and out.startswith("def f(") and len(out) > len("def f(\n")
    again = generate(capsys, checkpoint, "def f(", "--max_new_tokens", "12", "--temperature", "1.0", "--seed", "7")[1]
    other = generate(capsys, checkpoint, "def f(", "--max_new_tokens", "12", "--temperature", "1.0", "--seed", "8")[1]
    assert again == out and other != out  # the seed decides the sample


def test_prompts_from_the_command_line_and_a_file_give_the_same_samples(checkpoint, tmp_path, capsys):
    code, out, _ = generate(capsys, checkpoint, "import os", "class A:", "--num_samples", "2", *SAMPLE)
    parts = out.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert code == 0 and len(parts) == 4
    assert [p.startswith(prompt) for p, prompt in zip(parts, ["import os", "import os", "class A:", "class A:"])] == [True] * 4
    assert parts[0] != parts[1]  # two samples of one prompt
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n\nclass A:\n")  # blank lines are not prompts
    assert generate(capsys, checkpoint, "--prompt_file", prompts, "--num_samples", "2", *SAMPLE)[1] == out


def test_a_stop_string_ends_the_continuation_before_it(checkpoint, capsys):
    free = generate(capsys, checkpoint, "def f(", "--max_new_tokens", "20", "--temperature", "1.0", "--seed", "3")[1]
    continuation = free.rstrip("\n")[len("def f("):]
    assert len(continuation) > 6, "the test needs a continuation to cut"
    stop = continuation[3:6]
    cut = generate(capsys, checkpoint, "def f(", "--max_new_tokens", "20", "--temperature", "1.0", "--seed", "3",
                   "--stop", stop)[1]
    assert cut == "def f(" + continuation[: continuation.find(stop)] + "\n"


def test_topk_routing_generates_too(checkpoint, capsys):
    code, out, _ = generate(capsys, checkpoint, "def f(", "--max_new_tokens", "6", "--temperature", "0",
                            "--routing", "topk")
    assert code == 0 and out.startswith("def f(")


def test_standard_input_and_interactive_mode(checkpoint):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "modlm.cli.generate", str(checkpoint), "--max_new_tokens", "4", "--temperature", "0"]
    piped = subprocess.run(cmd, input="import os\nclass A:\n", capture_output=True, text=True, env=env, timeout=120)
    assert piped.returncode == 0, piped.stderr
    first, second = piped.stdout.split("-" * 40 + "\n")  # two prompts, two continuations
    assert first.startswith("import os") and second.startswith("class A:")
    talk = subprocess.run(cmd + ["--interactive"], input="import os\nclass A:\n", capture_output=True, text=True,
                          env=env, timeout=120)
    assert talk.returncode == 0, talk.stderr
    assert "no chat template" in talk.stderr
    lines = talk.stdout.split("\n")
    assert lines[0].startswith("> import os") and lines[1].startswith("> class A:")


def test_an_export_folder_generates_like_its_checkpoint(checkpoint, tmp_path, capsys):
    export = tmp_path / "export"
    assert eval_main([str(checkpoint), "--export", str(export), "--quiet", "--decode_tokens", "2",
                      "--prompt_tokens", "2"]) == 0
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
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (message, err)
