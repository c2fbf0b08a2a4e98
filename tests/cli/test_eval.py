"""eval.py on checkpoints of real tiny training runs: numbers, modes, export, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

import modlm
from modlm.cli.eval import main as eval_main
from modlm.cli.train import main as train_main
from modlm.training.export import remote_code_files
from tests.helpers import REPO, tiny_args

EVAL_FLAGS = ["--quiet", "--data.max_batches", "2", "--decode_tokens", "8", "--prompt_tokens", "8"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    """last.ckpt of a tiny MoD run and of its dense twin (``route_every: 0``)."""
    root = tmp_path_factory.mktemp("eval_runs")
    paths = {}
    for name, extra in {"mod": ["--model.capacity", "0.5"], "dense": ["--model.route_every", "0"]}.items():
        args = [
            "fit",
            *tiny_args(
                root / name, tiny_tokenizer, "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", *extra
            ),
        ]
        assert train_main(args) == 0
        paths[name] = root / name / "checkpoints" / "last.ckpt"
        assert paths[name].is_file()
    return paths


def run_eval(*argv) -> int:
    return eval_main([str(a) for a in argv])


def test_json_has_every_key_with_finite_values(checkpoints, tmp_path):
    out = tmp_path / "mod.json"
    assert run_eval(checkpoints["mod"], "--json", out, *EVAL_FLAGS) == 0
    result = json.loads(out.read_text())
    for key in (
        "topk.loss",
        "topk.ppl",
        "topk.bpb",
        "causal.loss",
        "causal.ppl",
        "causal.bpb",
        "causal.capacity_used",
        "causal.capacity_used.layer_1",
        "causal.causal_acc.layer_1",
        "causal.causal_precision.layer_1",
        "causal.causal_recall.layer_1",
        "decode_tokens_per_s",
        "decode_tokens_per_s_batched",
        "flops_per_token",
        "params",
    ):
        assert key in result and math.isfinite(result[key]), key
    assert result["topk.ppl"] == pytest.approx(math.exp(result["topk.loss"]), rel=1e-4)
    assert result["causal.ppl"] == pytest.approx(math.exp(result["causal.loss"]), rel=1e-4)
    assert result["topk.capacity_used"] == 0.5  # top-k processes exactly k = T/2 tokens
    assert 0 <= result["causal.capacity_used"] <= 1 and 0 <= result["causal.causal_acc.layer_1"] <= 1
    assert result["decode_tokens_per_s"] > 0 and result["decode_tokens_per_s_batched"] > 0
    assert 1 < result["decode_batch"] <= 16  # several validation rows generated at once


def test_dense_model_gives_identical_numbers_in_both_modes(checkpoints, tmp_path):
    out = tmp_path / "dense.json"
    assert run_eval(checkpoints["dense"], "--json", out, *EVAL_FLAGS) == 0
    result = json.loads(out.read_text())
    for metric in ("loss", "ppl", "bpb"):
        assert result[f"topk.{metric}"] == result[f"causal.{metric}"]
    assert result["routed_layers"] == [] and "causal.capacity_used" not in result


def test_export_round_trip_and_compare(checkpoints, tmp_path, capsys):
    exported = tmp_path / "export"
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert run_eval(checkpoints["mod"], "--json", first, "--export", exported, *EVAL_FLAGS) == 0
    printed = capsys.readouterr().out
    assert (
        f"exported: {exported}" in printed
        and f"modlm {modlm.__version__}; the model written by modlm {modlm.__version__}" in printed
    )
    assert {p.name for p in exported.iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "data.json",
        "README.md",  # modlm's own
        "tokenizer_config.json",
        "generation_config.json",
        *remote_code_files(),  # transformers'
    }
    assert run_eval(exported, "--json", second, "--compare", checkpoints["dense"], *EVAL_FLAGS) == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert b["topk.loss"] == a["topk.loss"] and b["causal.loss"] == a["causal.loss"]
    assert b["compare"]["routed_layers"] == []
    assert (tmp_path / "compare.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "| loss (causal) |" in table and "export" in table


def test_bad_inputs_end_with_one_line_and_status_2(checkpoints, tmp_path, tiny_tokenizer, capsys):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(checkpoints["mod"].read_bytes()[:5000])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 0}, foreign)
    from modlm.data import ModLMDataModule

    other = ModLMDataModule(
        source=tiny_tokenizer[0],
        vocab_size=300,
        val_fraction=0.2,
        num_workers=0,
        tokenizer_train_chars=50_000,
        cache_dir=str(tmp_path / "tok"),
    )
    cases = {
        "checkpoint not found": [tmp_path / "missing.ckpt"],
        "cannot read checkpoint": [corrupt],
        "is not a modlm checkpoint": [foreign],
        "tokenizer does not match": [checkpoints["mod"], "--data.tokenizer", other.tokenizer_file],
    }
    for message, argv in cases.items():
        assert run_eval(*argv, *EVAL_FLAGS) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_eval_script_runs_the_package_command(checkpoints, tmp_path):
    """``python eval.py`` is a thin entry point: the flags the benchmarks use reach ``modlm.cli.eval``."""
    import subprocess
    import sys

    out = tmp_path / "script.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "eval.py"),
            str(checkpoints["mod"]),
            "--json",
            str(out),
            "--quiet",
            "--decode_tokens",
            "4",
            "--device",
            "cpu",
            "--data.max_batches",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text())["params"] > 0


def test_command_line_reads_dotted_flags_and_the_same_settings_from_config(tmp_path):
    """One parser family with train.py: dotted groups, ``--config`` YAML equal to the flags."""
    from modlm.cli.eval import DataOptions, parse

    flags = [
        "--json",
        "out.json",
        "--data.source",
        "corpus/",
        "--data.max_batches",
        "3",
        "--decode_tokens",
        "8",
        "--precision",
        "bf16",
        "--quiet",
    ]
    run = parse(["model.ckpt", *flags])
    assert (run.ckpt, run.json, run.decode_tokens, run.precision, run.quiet) == (
        "model.ckpt",
        "out.json",
        8,
        "bf16",
        True,
    )
    assert run.data == DataOptions(source="corpus/", max_batches=3)
    assert run.prompt_tokens == 32 and run.seed == 1234 and run.device in ("cpu", "cuda")  # defaults
    config = tmp_path / "eval.yaml"
    config.write_text(
        "json: out.json\ndata:\n  source: corpus/\n  max_batches: 3\ndecode_tokens: 8\nprecision: bf16\nquiet: true\n"
    )
    assert parse(["model.ckpt", "--config", str(config)]) == run
    assert parse(["model.ckpt", "--config", str(config), "--data.max_batches", "5"]).data.max_batches == 5  # flags win


def test_help_shows_the_docstrings_and_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        eval_main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for text in (
        "--data.source",
        "--data.max_batches",
        "--config",
        "tokens generated by the decode-speed test",
        "checkpoint (.ckpt written by train.py",
    ):
        assert text in out, text
    for bad in (["model.ckpt", "--precision", "16"], ["model.ckpt", "--no_such_flag", "1"], []):
        assert eval_main(bad) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err
