"""Checkpoints that survive being cut off, and what ``--ckpt_path`` makes of a damaged one.

A save is written under a hidden name and renamed into place, so a process killed mid-write keeps
the previous ``last.ckpt``; ``--ckpt_path last`` takes the newest checkpoint whichever callback wrote
it and refuses, naming both, a damaged newest one; a corrupt or pickled-object file is a one-line
user error (exit 2) with nothing executed.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from modlm.cli.train import main
from modlm.saved import CheckpointError, checkpoint_damage
from modlm.training.checkpoint import checkpoint_candidates, resolve_last
from tests.helpers import REPO, tiny_args


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("modlm: error:")][-1]


def good_ckpt(path, step: int) -> None:
    torch.save({"state_dict": {"w": torch.full((4,), float(step))}, "global_step": step}, path)


def set_mtime(path, seconds: int) -> None:
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


@pytest.mark.slow
def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_whole(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    target.parent.mkdir()
    good_ckpt(target, 4)
    before = target.read_bytes()
    # A stand-in trainer whose save writes half a checkpoint, then the process dies by SIGKILL.
    script = textwrap.dedent(f"""
        import os, signal, types
        from modlm.training.checkpoint import save_atomically

        def save_checkpoint(path, weights_only=False):
            with open(path, "wb") as f:
                f.write(b"PK" + bytes(1000))
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        trainer = types.SimpleNamespace(is_global_zero=True, strategy=types.SimpleNamespace(barrier=lambda
        name=None: None))
        save_atomically(trainer, {str(target)!r}, save_checkpoint)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    assert target.read_bytes() == before  # untouched
    assert checkpoint_damage(target) is None
    assert (tmp_path / "checkpoints" / ".last.ckpt.partial").is_file()  # the cut-off write, hidden
    assert resolve_last(target.parent) == target  # and never taken for a checkpoint


def test_a_completed_save_replaces_the_file_and_leaves_nothing_hidden(tmp_path):
    import types

    from modlm.training.checkpoint import save_atomically

    target = tmp_path / "last.ckpt"
    good_ckpt(target, 4)
    (tmp_path / ".last.ckpt.partial").write_bytes(b"left by a killed save")
    trainer = types.SimpleNamespace(is_global_zero=True, strategy=types.SimpleNamespace(barrier=lambda name=None: None))
    save_atomically(trainer, target, lambda path: good_ckpt(path, 8))
    assert torch.load(target, weights_only=True)["global_step"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_last_is_the_newest_checkpoint_whichever_callback_wrote_it(tmp_path):
    ckpts, root = tmp_path / "checkpoints", tmp_path
    ckpts.mkdir()
    assert resolve_last(ckpts, root) is None  # nothing yet: start afresh
    for name, step, when in (("step=0000004.ckpt", 4, 100), ("last.ckpt", 8, 200), ("preempted.ckpt", 11, 300)):
        good_ckpt(ckpts / name, step)
        set_mtime(ckpts / name, when)
    assert resolve_last(ckpts, root) == ckpts / "preempted.ckpt"
    good_ckpt(root / "hpc_ckpt_1.ckpt", 12)  # Lightning's SLURM handler writes beside the run
    set_mtime(root / "hpc_ckpt_1.ckpt", 400)
    assert resolve_last(ckpts, root) == root / "hpc_ckpt_1.ckpt"
    (ckpts / ".last.ckpt.partial").write_bytes(b"half")  # a save in progress is never a candidate
    set_mtime(ckpts / ".last.ckpt.partial", 500)
    assert [p.name for p in checkpoint_candidates(ckpts, root)] == [
        "hpc_ckpt_1.ckpt",
        "preempted.ckpt",
        "last.ckpt",
        "step=0000004.ckpt",
    ]


def test_a_damaged_newest_checkpoint_is_named_with_the_newest_intact_one(tmp_path):
    good_ckpt(tmp_path / "step=0000004.ckpt", 4)
    set_mtime(tmp_path / "step=0000004.ckpt", 100)
    good_ckpt(tmp_path / "last.ckpt", 8)
    set_mtime(tmp_path / "last.ckpt", 200)
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "preempted.ckpt").write_bytes(data[: len(data) // 2])  # truncated
    set_mtime(tmp_path / "preempted.ckpt", 300)
    with pytest.raises(CheckpointError) as err:
        resolve_last(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "preempted.ckpt") in message and f"--ckpt_path {tmp_path / 'last.ckpt'}" in message
    assert "truncated or corrupt" in message
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    assert "without its .metadata" in checkpoint_damage(sharded)
    (sharded / ".metadata").write_bytes(b"index")
    assert checkpoint_damage(sharded) is None


class Payload:  # pickled by reference: loading it would mean importing and running code
    pass


@pytest.mark.parametrize("kind", ["corrupt", pytest.param("pickled", marks=pytest.mark.slow)])
def test_unreadable_checkpoint_file_is_one_line_and_exit_2(tmp_path, tiny_tokenizer, capsys, kind):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "corrupt":
        path.write_bytes(b"this is not a checkpoint")
    else:
        torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload()}}, path)
    for subcommand in ("fit", "validate"):
        assert main([subcommand, *tiny_args(tmp_path / "run", tiny_tokenizer, "--ckpt_path", str(path))]) == 2
        line = error_line(capsys)
        assert str(path) in line
        assert ("pickled objects" if kind == "pickled" else "truncated or corrupt") in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_ckpt_path_last_names_a_damaged_newest_checkpoint(tmp_path, tiny_tokenizer, capsys):
    root = tmp_path / "run"
    args = tiny_args(root, tiny_tokenizer, "--trainer.limit_val_batches", "0", "--checkpoint.every_n_train_steps", "2")
    assert main(["fit", *args, "--trainer.max_steps", "2"]) == 0
    last = root / "checkpoints" / "last.ckpt"
    damaged = root / "checkpoints" / "preempted.ckpt"
    damaged.write_bytes(last.read_bytes()[:1000])
    set_mtime(damaged, int(last.stat().st_mtime) + 10)
    assert main(["fit", *args, "--trainer.max_steps", "4", "--ckpt_path", "last"]) == 2
    line = error_line(capsys)
    # last.ckpt links to step 2: the newest intact checkpoint is named by either path
    intact = root / "checkpoints" / "step=0000002.ckpt"
    assert last.resolve() == intact.resolve()
    assert str(damaged) in line and (f"--ckpt_path {last}" in line or f"--ckpt_path {intact}" in line), line
    assert torch.load(last, weights_only=True)["global_step"] == 2  # nothing trained, nothing overwritten
