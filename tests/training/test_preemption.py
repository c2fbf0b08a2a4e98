"""Pre-emption: SIGTERM or SIGUSR1 makes every rank save at the next step boundary and stop; a run
resumed with ``--ckpt_path last`` (which must pick that save, the newest) logs exactly the losses of
an uninterrupted run.

The signal reaches rank 0 only, during step S + 1; the save must hold S + 1 steps on every rank
(the other rank learns of it through the agreement at the step boundary).
"""
import pytest
import torch

from tests.helpers import run_train, scalars, tiny_args

N, S = 8, 5  # steps in all; the signal lands while step S + 1 runs
COMMON = ("--trainer.max_steps", str(N), "--model.lr_decay_steps", str(N), "--checkpoint.every_n_train_steps", "4",
          "--trainer.val_check_interval", "4")


def preempt_and_resume(tmp_path, data, signal_name: str, *extra: str) -> tuple[dict, dict]:
    full = run_train("fit", *tiny_args(tmp_path / "full", data, *COMMON, *extra))
    assert full.returncode == 0, full.stderr[-3000:]
    cut = run_train("fit", *tiny_args(tmp_path / "cut", data, *COMMON, *extra,
                                      "--trainer.callbacks+=tests.helpers.callbacks.SignalAtStep",
                                      "--trainer.callbacks.step", str(S), "--trainer.callbacks.signal", signal_name))
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert f"pre-empted ({signal_name}) after step {S + 1}" in cut.stderr + cut.stdout
    saved = tmp_path / "cut" / "checkpoints" / "preempted.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == S + 1
    # the newest checkpoint: last.ckpt is still the one of step 4
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = run_train("fit", *tiny_args(tmp_path / "cut", data, *COMMON, *extra, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {S + 1} of {saved}" in resumed.stderr + resumed.stdout
    return (scalars(tmp_path / "full" / "lightning_logs" / "version_0"),
            scalars(tmp_path / "cut" / "lightning_logs" / "version_0"))  # the resumed run goes on in it


def assert_same_losses(want: dict, got: dict) -> None:
    assert set(got["train/loss"]) == set(range(N))  # one curve: the pre-empted run's steps, then the resumed one's
    for step in range(S + 1, N):
        assert got["train/loss"][step] == pytest.approx(want["train/loss"][step], abs=1e-6, rel=0), step
    assert got["val/loss"][N - 1] == pytest.approx(want["val/loss"][N - 1], abs=1e-6, rel=0)


def test_sigterm_saves_at_the_step_boundary_and_resumes_exactly(tmp_path, tiny_tokenizer):
    want, got = preempt_and_resume(tmp_path, tiny_tokenizer, "SIGTERM", "--data.num_workers", "1")
    assert_same_losses(want, got)


@pytest.mark.slow
def test_sigusr1_on_one_of_two_ranks_saves_on_both_and_resumes_exactly(tmp_path, tiny_tokenizer):
    want, got = preempt_and_resume(tmp_path, tiny_tokenizer, "SIGUSR1", "--trainer.accelerator", "cpu",
                                   "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert_same_losses(want, got)
