"""Exact resume: a run killed after step k and resumed from its checkpoint logs the same losses
(and learning rates, and validation loss) at every step as the uninterrupted run.

Everything that decides the next step must come back: weights, AdamW moments, the LR schedule's
position, step counters, and the data stream's position (the data module's state, saved by
Lightning in the checkpoint). The killed run dies by SIGKILL, with a dataloader worker running, two
steps after its last checkpoint: the resumed run goes on in the killed run's TensorBoard version
folder, where those two steps are logged again and TensorBoard shows each tag as one curve.
"""

import signal

import pytest

from tests.helpers import run_train, scalars, tiny_args

pytestmark = pytest.mark.slow  # each test trains, kills and resumes runs in subprocesses

N, K, SAVED = 12, 10, 8  # total steps; the killed run dies after step K, its last checkpoint is of step SAVED
COMMON = (
    "--trainer.max_steps",
    str(N),
    "--checkpoint.every_n_train_steps",
    "4",
    "--trainer.val_check_interval",
    "6",
    "--data.num_workers",
    "1",
)


@pytest.mark.parametrize("routing", ["learned", "random"])
def test_killed_and_resumed_run_logs_identical_losses(tmp_path, tiny_tokenizer, routing):
    # random routing draws from torch's generator, so its state must come back too
    common = COMMON + (("--model.random_routing", "true") if routing == "random" else ())
    full = run_train("fit", *tiny_args(tmp_path / "full", tiny_tokenizer, *common))
    assert full.returncode == 0, full.stderr[-3000:]

    killed = run_train(
        "fit",
        *tiny_args(
            tmp_path / "cut",
            tiny_tokenizer,
            *common,
            "--trainer.callbacks+=tests.helpers.callbacks.KillAtStep",
            "--trainer.callbacks.step",
            str(K),
        ),
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step=0000004.ckpt", f"step={SAVED:07d}.ckpt"]

    resumed = run_train("fit", *tiny_args(tmp_path / "cut", tiny_tokenizer, *common, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = resumed.stdout + resumed.stderr
    assert f"modlm: resuming from step {SAVED} of {tmp_path / 'cut' / 'checkpoints'}" in said
    assert "exists and is not empty" not in said and "dirpath has changed" not in said

    want = scalars(tmp_path / "full" / "lightning_logs" / "version_0")
    assert [p.name for p in (tmp_path / "cut" / "lightning_logs").iterdir()] == ["version_0"]
    got = scalars(tmp_path / "cut" / "lightning_logs" / "version_0")  # both runs, what TensorBoard shows
    assert len(want["train/loss"]) == N  # steps 1..N are logged at global steps 0..N-1
    for tag in ("train/loss", "train/aux_loss", "lr-AdamW/pg1", "flops/total"):  # pg1: the decayed group
        assert set(got[tag]) == set(want[tag]), (tag, sorted(got[tag]), sorted(want[tag]))
        for step, value in got[tag].items():
            assert value == pytest.approx(want[tag][step], abs=1e-6, rel=0), (tag, step)
    assert got["val/loss"] == pytest.approx(want["val/loss"], abs=1e-6, rel=0)
    # the throughput monitor's running totals go on from the checkpoint too
    assert got["train/samples"] == {step: 4.0 * (step + 1) for step in range(N)}
    assert all(got["train/time"][step] < got["train/time"][step + 1] for step in range(N - 1))
    # the run did learn something and the step-8 checkpoint was not rewritten by the resume
    assert (tmp_path / "cut" / "checkpoints" / "step=0000012.ckpt").is_file()
