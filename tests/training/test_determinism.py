"""Same command, same machine, same losses: two identical runs log bit-identical scalars.

Everything random in a run (weight init, data order, dropout-free routing) flows from
``seed_everything`` and the data stream's own seeded order, and torch's CPU kernels reduce in a
fixed order for a fixed thread count, so nothing may differ between the two runs.
"""

import pytest

from tests.helpers import run_train, scalars, tiny_args

pytestmark = pytest.mark.slow  # each test trains two whole runs in subprocesses

ARGS = ("--trainer.max_steps", "10", "--trainer.val_check_interval", "5", "--data.num_workers", "1")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_two_identical_runs_log_identical_losses(tmp_path, tiny_tokenizer, precision):
    logs = []
    for name in ("first", "second"):
        done = run_train("fit", *tiny_args(tmp_path / name, tiny_tokenizer, *ARGS, "--trainer.precision", precision))
        assert done.returncode == 0, done.stderr[-3000:]
        logs.append(scalars(tmp_path / name / "lightning_logs" / "version_0"))
    first, second = logs
    for tag in ("train/loss", "train/aux_loss", "val/loss", "val/loss_causal"):
        assert len(first[tag]) == (10 if tag.startswith("train") else 2), tag
        assert first[tag] == second[tag], tag  # exact: not approx
