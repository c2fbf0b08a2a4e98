"""Exact resume: a run killed after step k and resumed from its checkpoint logs the same losses
(and learning rates, and validation loss) at every step as the uninterrupted run.

Everything that decides the next step must come back: weights, AdamW moments, the LR schedule's
position, step counters, and the data stream's position (the data module's state, saved by
Lightning in the checkpoint). The killed run dies by SIGKILL, with a dataloader worker running.
"""
import signal

import pytest

from tests.helpers import run_train, scalars, tiny_args

N, K = 12, 8  # total steps; the killed run dies after step K (a checkpoint every 4 steps)
COMMON = ("--trainer.max_steps", str(N), "--checkpoint.every_n_train_steps", "4",
          "--trainer.val_check_interval", "6", "--data.num_workers", "1")


@pytest.mark.parametrize("routing", ["learned", "random"])
def test_killed_and_resumed_run_logs_identical_losses(tmp_path, tiny_tokenizer, routing):
    # random routing draws from torch's generator, so its state must come back too
    common = COMMON + (("--model.random_routing", "true") if routing == "random" else ())
    full = run_train("fit", *tiny_args(tmp_path / "full", tiny_tokenizer, *common))
    assert full.returncode == 0, full.stderr[-3000:]

    killed = run_train("fit", *tiny_args(tmp_path / "cut", tiny_tokenizer, *common,
                                         "--trainer.callbacks+=tests.helpers.callbacks.KillAtStep",
                                         "--trainer.callbacks.step", str(K)))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step=0000004.ckpt", "step=0000008.ckpt"]

    resumed = run_train("fit", *tiny_args(tmp_path / "cut", tiny_tokenizer, *common, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    want = scalars(tmp_path / "full" / "lightning_logs" / "version_0")
    got = scalars(tmp_path / "cut" / "lightning_logs" / "version_1")  # the resumed run's logs
    train_steps = [s for s in want["train/loss"] if s >= K]
    assert len(train_steps) == N - K  # steps K+1..N are logged at global steps K..N-1
    for tag in ("train/loss", "train/aux_loss", "lr-AdamW/pg1"):  # pg1: the decayed group
        assert set(got[tag]) == {s for s in want[tag] if s >= K}, (tag, sorted(got), got[tag], want[tag])
        for step, value in got[tag].items():
            assert value == pytest.approx(want[tag][step], abs=1e-6, rel=0), (tag, step)
    assert got["val/loss"][N - 1] == pytest.approx(want["val/loss"][N - 1], abs=1e-6, rel=0)
    # the run did learn something and the step-8 checkpoint was not rewritten by the resume
    assert (tmp_path / "cut" / "checkpoints" / "step=0000012.ckpt").is_file()
