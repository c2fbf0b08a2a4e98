"""The command line: default config, outputs under default_root_dir, linked
arguments, TensorBoard tags, and user errors as one line with a non-zero exit.

Runs ``modlm.cli.main`` in-process (what ``train.py`` calls) on the tiny preset.
"""

import hashlib

import pytest
import torch
import yaml

from modlm.cli.train import DEFAULT_CONFIG, main
from tests.helpers import REPO, scalars, tiny_args


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("modlm: error:")][-1]


def test_no_config_means_the_default_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    default = yaml.safe_load(DEFAULT_CONFIG.read_text())
    # the checkout's configs/ and the packaged presets are one folder
    assert DEFAULT_CONFIG.resolve() == (REPO / "configs" / "default.yaml").resolve()
    for group in ("trainer", "model", "data", "checkpoint"):
        for key, value in default.get(group, {}).items():
            assert printed[group][key] == value, (group, key)
    assert printed["model"]["capacity"] == 0.125 and printed["model"]["route_every"] == 2
    # the default run's other settings come from the code's defaults, their only source
    assert (printed["model"]["lr"], printed["model"]["warmup_steps"]) == (0.002, 50)
    assert printed["data"]["val_windows"] == 64 and printed["checkpoint"]["every_n_train_steps"] == 100


@pytest.mark.slow
def test_run_puts_every_output_under_default_root_dir(tmp_path, tiny_tokenizer, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = tmp_path / "run"
    assert main(["fit", *tiny_args(root, tiny_tokenizer, "--trainer.max_steps", "10")]) == 0
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt", "step=0000010.ckpt"]
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and str(last.readlink()) == "step=0000010.ckpt"  # a relative link, not a copy
    version = root / "lightning_logs" / "version_0"
    assert (version / "config.yaml").is_file() and list(version.glob("events.out.tfevents.*"))

    tags = set(scalars(version))
    assert {
        "train/loss",
        "train/aux_loss",
        "val/loss",
        "val/ppl",
        "val/loss_causal",
        "val/ppl_causal",
        "lr-AdamW/pg1",
    } <= tags
    assert {"train/device/flops_per_sec", "train/device/items_per_sec"} <= tags  # ThroughputMonitor, our FLOPs

    # vocab_size follows the tokenizer, max_seq_len the windows; the checkpoint rebuilds the model
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    from tokenizers import Tokenizer

    assert ckpt["hyper_parameters"]["vocab_size"] == Tokenizer.from_file(tiny_tokenizer[1]).get_vocab_size()
    assert ckpt["hyper_parameters"]["max_seq_len"] == 32
    assert ckpt["global_step"] == 10


def test_bad_model_value_is_one_line_and_exit_2(tmp_path, tiny_tokenizer, capsys):
    assert main(["fit", *tiny_args(tmp_path, tiny_tokenizer, "--model.capacity", "1.5")]) == 2
    assert "capacity" in error_line(capsys)
    assert not (tmp_path / "checkpoints").exists()


def test_missing_data_is_one_line_and_exit_2(tmp_path, tiny_tokenizer, capsys):
    missing = tmp_path / "no_such_corpus"
    assert main(["fit", *tiny_args(tmp_path, tiny_tokenizer, "--data.source", str(missing))]) == 2
    assert str(missing) in error_line(capsys)


def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path, tiny_tokenizer, capsys):
    missing = tmp_path / "nope.ckpt"
    assert main(["fit", *tiny_args(tmp_path, tiny_tokenizer, "--ckpt_path", str(missing))]) == 2
    assert "nope.ckpt" in error_line(capsys)


@pytest.mark.slow
def test_checkpoint_of_another_shape_is_refused_and_left_intact(tmp_path, tiny_tokenizer, capsys):
    """The command line's layer: before Lightning rebuilds the module from a checkpoint, a fit
    resumed (a file, or ``last``) with another ``--model`` shape is refused by the saved
    hyperparameters, naming the field and both values, in one line with exit code 2, and the
    checkpoint is left as it was. (The module's own tensor check is ``test_module.py``'s.)"""
    root = tmp_path / "run"
    assert (
        main(["fit", *tiny_args(root, tiny_tokenizer, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")])
        == 0
    )
    last = root / "checkpoints" / "last.ckpt"
    before = digest(last)
    for ckpt in (str(last), "last"):  # an explicit file, and the `last` lookup
        code = main(["fit", *tiny_args(root, tiny_tokenizer, "--model.d_model", "48", "--ckpt_path", ckpt)])
        assert code == 2
        line = error_line(capsys)
        assert "d_model=32 in the checkpoint, 48 in this run" in line, line
    assert digest(last) == before


@pytest.mark.slow
def test_non_finite_loss_exits_1_and_keeps_the_runs_checkpoints(tmp_path, tiny_tokenizer, capsys):
    """The command line's layer of the non-finite-loss guard: every run has it, its error ends the
    run with exit code 1 and one line, and the run's own checkpointing (atomic saves, ``last.ckpt``
    a link) keeps what it saved before: a resumed run that diverges after step 6 leaves step 6
    as ``last.ckpt`` and writes nothing after it. (Which step the guard stops at and names is the
    guard's layer, ``test_module.py``.)"""
    root = tmp_path / "run"
    args = tiny_args(root, tiny_tokenizer, "--trainer.limit_val_batches", "0", "--checkpoint.every_n_train_steps", "2")
    assert main(["fit", *args, "--trainer.max_steps", "4"]) == 0
    saved = {p.name: digest(p) for p in (root / "checkpoints").iterdir()}
    code = main(
        [
            "fit",
            *args,
            "--trainer.max_steps",
            "8",
            "--ckpt_path",
            "last",
            "--trainer.callbacks+=tests.helpers.callbacks.PoisonAtStep",
            "--trainer.callbacks.step",
            "6",
        ]
    )
    assert code == 1
    assert error_line(capsys).startswith("modlm: error: training loss is nan")
    after = {p.name: digest(p) for p in (root / "checkpoints").iterdir()}
    assert after["last.ckpt"] != saved["last.ckpt"]  # step 6 was saved normally ...
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert set(after) == set(saved) | {"step=0000006.ckpt"}  # ... and nothing after the NaN
    assert all(after[name] == saved[name] for name in saved if name != "last.ckpt")


@pytest.mark.slow
def test_last_link_is_replaced_not_written_through(tmp_path, tiny_tokenizer):
    """last.ckpt stays one name across resumes. A resumed run that ends before its next scheduled
    checkpoint writes a full last.ckpt: the link to the older step is replaced by a file of the new
    step, and that older step is left as it was; the next scheduled checkpoint is linked again."""
    root = tmp_path / "run"
    args = tiny_args(root, tiny_tokenizer, "--trainer.limit_val_batches", "0", "--checkpoint.every_n_train_steps", "4")
    folder = root / "checkpoints"
    step4, step8, last = folder / "step=0000004.ckpt", folder / "step=0000008.ckpt", folder / "last.ckpt"
    assert main(["fit", *args, "--trainer.max_steps", "4"]) == 0
    assert last.is_symlink() and last.resolve() == step4.resolve()
    before = digest(step4)
    assert main(["fit", *args, "--trainer.max_steps", "6", "--ckpt_path", "last"]) == 0
    assert digest(step4) == before and torch.load(step4, weights_only=True)["global_step"] == 4
    assert not last.is_symlink() and torch.load(last, weights_only=True)["global_step"] == 6
    assert main(["fit", *args, "--trainer.max_steps", "8", "--ckpt_path", "last"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step=0000004.ckpt", "step=0000008.ckpt"]
    assert last.is_symlink() and last.resolve() == step8.resolve() and digest(step4) == before


@pytest.mark.slow
def test_a_moved_or_copied_run_folder_resumes_with_its_last_link(tmp_path, tiny_tokenizer, recwarn):
    """A run folder moved (``mv``) or copied (``cp -r``: every file gets the copy's time) and resumed
    with ``--ckpt_path last`` goes on from its last step: ``last.ckpt`` (a relative link) moves on to
    the new step, no ``last-v1.ckpt`` appears, the original of a copy is left alone, and Lightning's
    warnings about the folder (its saved absolute path, its being non-empty) stay silent. A fresh run
    started in a used folder is still told that it is not empty."""
    import os
    import shutil

    def fit(root, steps, *extra):
        assert (
            main(
                [
                    "fit",
                    *tiny_args(
                        root,
                        tiny_tokenizer,
                        "--trainer.limit_val_batches",
                        "0",
                        "--checkpoint.every_n_train_steps",
                        "2",
                        "--trainer.max_steps",
                        str(steps),
                        "--model.lr_decay_steps",
                        "8",
                        *extra,
                    ),
                ]
            )
            == 0
        )

    def saved(root) -> dict:
        folder = root / "checkpoints"
        return {
            p.name: (str(p.readlink()) if p.is_symlink() else torch.load(p, weights_only=True)["global_step"])
            for p in folder.iterdir()
        }

    first, moved, copied = tmp_path / "first", tmp_path / "moved", tmp_path / "copied"
    fit(first, 4)
    shutil.move(first, moved)
    fit(moved, 6, "--ckpt_path", "last")
    assert saved(moved) == {
        "last.ckpt": "step=0000006.ckpt",
        "step=0000002.ckpt": 2,
        "step=0000004.ckpt": 4,
        "step=0000006.ckpt": 6,
    }
    shutil.copytree(moved, copied, symlinks=True, copy_function=shutil.copy)
    for age, path in enumerate(sorted((copied / "checkpoints").glob("step=*.ckpt"))):  # copied newest step first
        os.utime(path, ns=(10**18 - age * 10**9,) * 2)
    before = {p.name: digest(p) for p in (moved / "checkpoints").iterdir()}
    fit(copied, 8, "--ckpt_path", "last")
    assert saved(copied) == {**saved(moved), "last.ckpt": "step=0000008.ckpt", "step=0000008.ckpt": 8}
    assert {p.name: digest(p) for p in (moved / "checkpoints").iterdir()} == before
    for root in (moved, copied):
        assert [p.name for p in (root / "lightning_logs").iterdir()] == ["version_0"]
    said = [str(w.message) for w in recwarn]
    assert not [m for m in said if "dirpath has changed" in m or "exists and is not empty" in m], said

    fit(copied, 2)  # afresh, in a folder that holds another run's checkpoints
    assert any("exists and is not empty" in str(w.message) for w in recwarn)
