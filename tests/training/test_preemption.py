"""Pre-emption: SIGTERM or SIGUSR1 makes every rank save at the next step boundary and stop; a run
resumed with ``--ckpt_path last`` (which must pick that save, the newest) logs exactly the losses of
an uninterrupted run.

The signal reaches rank 0 only, during step S + 1; the save must hold S + 1 steps on every rank
(the other rank learns of it through the agreement at the step boundary).
"""

import json

import pytest
import torch

from tests.helpers import run_train, scalars, tiny_args

pytestmark = pytest.mark.slow  # signals to training processes, one or two ranks, then a resume

N, S = 8, 5  # steps in all; the signal lands while step S + 1 runs
COMMON = (
    "--trainer.max_steps",
    str(N),
    "--model.lr_decay_steps",
    str(N),
    "--checkpoint.every_n_train_steps",
    "4",
    "--trainer.val_check_interval",
    "4",
)


def preempt_and_resume(tmp_path, data, signal_name: str, *extra: str) -> tuple[dict, dict]:
    full = run_train("fit", *tiny_args(tmp_path / "full", data, *COMMON, *extra))
    assert full.returncode == 0, full.stderr[-3000:]
    cut = run_train(
        "fit",
        *tiny_args(
            tmp_path / "cut",
            data,
            *COMMON,
            *extra,
            "--trainer.callbacks+=tests.helpers.callbacks.SignalAtStep",
            "--trainer.callbacks.step",
            str(S),
            "--trainer.callbacks.signal",
            signal_name,
        ),
    )
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert f"pre-empted ({signal_name}) after step {S + 1}" in cut.stderr + cut.stdout
    saved = tmp_path / "cut" / "checkpoints" / "preempted.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == S + 1
    # the newest checkpoint: last.ckpt is still the one of step 4
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = run_train("fit", *tiny_args(tmp_path / "cut", data, *COMMON, *extra, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {S + 1} of {saved}" in resumed.stderr + resumed.stdout
    return (
        scalars(tmp_path / "full" / "lightning_logs" / "version_0"),
        scalars(tmp_path / "cut" / "lightning_logs" / "version_0"),
    )  # the resumed run goes on in it


def assert_same_losses(want: dict, got: dict) -> None:
    assert set(got["train/loss"]) == set(range(N))  # one curve: the pre-empted run's steps, then the resumed one's
    for step in range(S + 1, N):
        assert got["train/loss"][step] == pytest.approx(want["train/loss"][step], abs=1e-6, rel=0), step
    assert got["val/loss"][N - 1] == pytest.approx(want["val/loss"][N - 1], abs=1e-6, rel=0)


def test_sigterm_saves_at_the_step_boundary_and_resumes_exactly(tmp_path, tiny_tokenizer):
    want, got = preempt_and_resume(tmp_path, tiny_tokenizer, "SIGTERM", "--data.num_workers", "1")
    assert_same_losses(want, got)


def test_sigusr1_on_one_of_two_ranks_saves_on_both_and_resumes_exactly(tmp_path, tiny_tokenizer):
    want, got = preempt_and_resume(
        tmp_path,
        tiny_tokenizer,
        "SIGUSR1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    )
    assert_same_losses(want, got)


def test_two_ranks_agree_on_a_signal_only_after_the_steps_that_log(tmp_path, tiny_tokenizer):
    """Agreeing on a signal is a collective, a host sync of every rank on a GPU: in a 2-process run it
    happens only after the steps that log (which read the device anyway), and a signal that lands
    during step 6 is acted on after step 8, the next step that logs. Every collective both ranks call
    while a step runs is watched (``CollectiveSpy``)."""
    log_every = 4
    done = run_train(
        "fit",
        *tiny_args(
            tmp_path,
            tiny_tokenizer,
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--trainer.max_steps",
            "12",
            "--model.lr_decay_steps",
            "12",
            "--trainer.log_every_n_steps",
            str(log_every),
            "--trainer.val_check_interval",
            "12",
            "--checkpoint.every_n_train_steps",
            "12",
            "--trainer.callbacks+=tests.helpers.callbacks.SignalAtStep",
            "--trainer.callbacks.step",
            "5",
            "--trainer.callbacks.signal",
            "SIGUSR1",
            "--trainer.callbacks+=tests.helpers.callbacks.CollectiveSpy",
        ),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pre-empted (SIGUSR1) after step 8" in done.stderr + done.stdout
    assert torch.load(tmp_path / "checkpoints" / "preempted.ckpt", weights_only=True)["global_step"] == 8
    for rank in (0, 1):
        noted = json.loads((tmp_path / f"collectives-rank{rank}.json").read_text())
        seen = {int(step): calls for step, calls in noted.items()}
        assert set(seen) <= {4, 8}, {step: calls for step, calls in seen.items() if step % log_every}
        assert "all_reduce from _anyone (preemption.py)" in seen[4], seen  # it watches the agreement
