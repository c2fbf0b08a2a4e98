"""A trained model travels: a checkpoint copied alone (its corpus gone) evaluates, validates,
generates and exports with the numbers it has in place; a resumed run whose tokenizer is not the
checkpoint's is refused naming both fingerprints; ``predict`` is not offered."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from modlm.cli.eval import main as eval_main
from modlm.cli.generate import main as generate_main
from modlm.cli.train import main as train_main
from modlm.data.tokenizer import fingerprint, load_tokenizer
from modlm.model.version import FORMAT, VERSION_KEY, __version__
from modlm.saved import load_saved
from tests.helpers import REPO, run_train, scalars, tiny_args

pytestmark = pytest.mark.slow  # training runs, a resume and a subprocess that reads a copied checkpoint

EVAL_FLAGS = ["--quiet", "--decode_tokens", "4", "--prompt_tokens", "4"]


@pytest.fixture(scope="module")
def travelled(tmp_path_factory, tiny_tokenizer):
    """A tiny run's checkpoint, evaluated in place, then copied alone to another folder with a copy
    of the corpus it was trained on deleted: ``(in-place checkpoint, copied checkpoint, tokenizer)``."""
    root = tmp_path_factory.mktemp("travel")
    corpus = root / "corpus"
    shutil.copytree(tiny_tokenizer[0], corpus)
    args = tiny_args(
        root / "run", (str(corpus), tiny_tokenizer[1]), "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"
    )
    assert train_main(["fit", *args]) == 0
    in_place = root / "run" / "checkpoints" / "last.ckpt"
    alone = root / "elsewhere" / "model.ckpt"
    alone.parent.mkdir()
    shutil.copy(in_place.resolve(), alone)
    return in_place, alone, corpus


def evaluate(path, out) -> dict:
    assert eval_main([str(path), "--json", str(out), *EVAL_FLAGS]) == 0
    return json.loads(out.read_text())


def test_the_checkpoint_carries_its_tokenizer_and_validation_windows(travelled, tiny_tokenizer):
    in_place, _, _ = travelled
    ckpt = torch.load(in_place, weights_only=True)
    tok = load_tokenizer(tiny_tokenizer[1])
    assert ckpt["tokenizer"]["sha256"] == fingerprint(tok)
    windows = ckpt["validation_windows"]
    assert windows.shape == (8, 33) and windows.dtype == torch.int16  # tiny.yaml: 8 windows of 32 + 1
    saved = load_saved(str(in_place))
    assert fingerprint(saved.tokenizer) == fingerprint(tok)
    assert torch.equal(saved.validation_windows, windows.long())


def test_a_copied_checkpoint_evaluates_validates_generates_and_exports_without_its_corpus(travelled, tmp_path, capsys):
    in_place, alone, corpus = travelled
    here = evaluate(in_place, tmp_path / "here.json")
    shutil.rmtree(corpus)  # the corpus is gone from here on (the module's other tests run before, or need none)
    there = evaluate(alone, tmp_path / "there.json")
    for key in ("topk.loss", "causal.loss", "topk.bpb", "causal.capacity_used", "topk.tokens"):
        assert there[key] == here[key], key

    val = tmp_path / "val"
    run = [
        "validate",
        "--ckpt_path",
        str(alone),
        "--trainer.default_root_dir",
        str(val),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.precision",
        "32-true",
    ]
    assert train_main(run) == 0
    (version,) = (val / "lightning_logs").glob("version_*")
    (loss,) = scalars(version)["val/loss"].values()
    assert loss == pytest.approx(here["topk.loss"], abs=1e-5)
    capsys.readouterr()

    assert generate_main([str(alone), "def f(", "--max_new_tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def f(")
    export = tmp_path / "export"
    assert eval_main([str(alone), "--export", str(export), *EVAL_FLAGS]) == 0
    assert (export / "tokenizer.json").is_file() and (export / "model.safetensors").is_file()


def test_a_checkpoint_records_its_modlm_and_one_of_another_format_is_refused_in_one_line(
    travelled, tmp_path, capsys, tiny_tokenizer
):
    """Every checkpoint names the modlm that wrote it; evaluating, generating from or resuming one of another
    format (one of modlm before 0.2.0 records nothing) stops in one line naming that version, reading nothing
    into a model it may not fit, and the checkpoint is left as it was."""
    in_place, _, _ = travelled
    ckpt = torch.load(in_place, weights_only=True)
    assert ckpt[VERSION_KEY] == {"version": __version__, "format": FORMAT}
    for name, record in (("older.ckpt", None), ("newer.ckpt", {"version": "9.0.0", "format": FORMAT + 1})):
        path = tmp_path / name
        changed = {k: v for k, v in ckpt.items() if k != VERSION_KEY}
        torch.save(changed if record is None else {**changed, VERSION_KEY: record}, path)
        version = "before 0.2.0" if record is None else "9.0.0"
        capsys.readouterr()
        assert eval_main([str(path), *EVAL_FLAGS]) == 2 and generate_main([str(path), "def "]) == 2
        for line in capsys.readouterr().err.strip().splitlines():
            assert line.startswith(f"modlm: error: {path} was written by modlm {version}"), line
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copy(tmp_path / "older.ckpt", run / "last.ckpt")
    args = tiny_args(tmp_path / "run", tiny_tokenizer, "--trainer.max_steps", "6")
    done = run_train("fit", *args, "--ckpt_path", "last")
    assert done.returncode == 2 and "was written by modlm before 0.2.0" in done.stderr.strip().splitlines()[-1]


def test_resuming_with_another_tokenizer_is_refused_naming_both_fingerprints(tmp_path, tiny_tokenizer):
    """A corpus small enough that the tokenizer learns from all of it: one more file retrains it."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted((REPO / "src" / "modlm" / "model").glob("*.py"))[:6]:
        shutil.copy(path, corpus / path.name)
    args = [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.enable_progress_bar",
        "false",
        "--data.source",
        str(corpus),
        "--data.val_fraction",
        "0.2",
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--trainer.limit_val_batches",
        "0",
    ]
    assert train_main(["fit", *args, "--trainer.max_steps", "2"]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = torch.load(last, weights_only=True)["tokenizer"]["sha256"]
    (corpus / "more.txt").write_text("zyxw vutsr qponm " * 400)
    done = run_train("fit", *args, "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("modlm: error:") and before[:12] in line and "fingerprint" in line, line
    assert torch.load(last, weights_only=True)["global_step"] == 2  # nothing trained, nothing overwritten


def test_predict_is_not_offered():
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "predict"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "modlm: error: unknown command 'predict': expected one of fit, validate, test; train.py --help lists every "
        "option"
    ]
