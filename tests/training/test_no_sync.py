"""A plain training step reads nothing on the host: no ``.item()``, ``.tolist()``, ``.cpu()``,
``nonzero``, tensor truth value or number conversion, and no device synchronisation, between two
steps that log. Each of those stalls an accelerator's launch queue, which a small model depends on.

Run on the CPU, where nothing syncs, the test sees the calls that would sync on a GPU: every one made
while a step that does not log is running (the run's own callbacks, Lightning's loops and logger
included). The optimizer's step counters are the one exception: they are host tensors on every
device (``torch.optim``), so reading them costs no sync.
"""

from __future__ import annotations

import collections
import traceback

import lightning.pytorch as pl
import pytest
import torch

from modlm.cli.train import main as train_main
from modlm.flops import training_flops
from modlm.training.callbacks.throughput import TokenThroughput
from tests.helpers import TINY_DATA, scalars, tiny_args, tiny_preset_config

pytestmark = pytest.mark.slow  # each test trains a run and traces every host read

LOG_EVERY, STEPS = 4, 12
READS = [(torch.Tensor, name) for name in ("item", "tolist", "cpu", "nonzero", "__bool__", "__float__", "__int__")]
READS += [(torch, "nonzero"), (torch.cuda, "synchronize")]
# The throughput monitor's timing syncs the device on an accelerator; on the CPU it is watched by name.
READS += [(TokenThroughput, "_synchronized_clock")]


class StepWatch(pl.Callback):
    """Notes which optimizer step is running (the one that, when done, has global_step ``step``)."""

    running: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        StepWatch.running = trainer.global_step + 1

    def on_train_end(self, trainer, pl_module):
        StepWatch.running = None


@pytest.fixture
def host_reads(monkeypatch):
    """Every host read made while a training step runs: step -> [(what, where)]."""
    seen = collections.defaultdict(list)

    def spy(original, name):
        def wrapper(*args, **kwargs):
            if StepWatch.running is not None:
                stack = "".join(traceback.format_stack(limit=14)[:-1])
                if "torch/optim/" not in stack:
                    seen[StepWatch.running].append((name, stack))
            return original(*args, **kwargs)

        return wrapper

    for owner, name in READS:
        monkeypatch.setattr(owner, name, spy(getattr(owner, name), name))
    yield seen
    StepWatch.running = None


@pytest.mark.parametrize("bar", ["false", "true"], ids=["no-progress-bar", "progress-bar"])
def test_steps_that_do_not_log_read_nothing_on_the_host(tmp_path, tiny_tokenizer, host_reads, bar):
    """With the progress bar too: it reads ``train/loss`` when it refreshes, on logging steps."""
    args = tiny_args(
        tmp_path,
        tiny_tokenizer,
        "--trainer.max_steps",
        str(STEPS),
        "--trainer.log_every_n_steps",
        str(LOG_EVERY),
        "--trainer.val_check_interval",
        str(STEPS),
        "--checkpoint.every_n_train_steps",
        str(STEPS),
        "--trainer.callbacks+=tests.training.test_no_sync.StepWatch",
        "--trainer.enable_progress_bar",
        bar,
    )
    assert train_main(["fit", *args, "--throughput.window_size", "2"]) == 0
    plain = {step: calls for step, calls in host_reads.items() if step % LOG_EVERY}
    assert not plain, next(iter(plain.values()))[0][1]
    assert host_reads[4], "the test must see the reads of a logging step (else it watches nothing)"
    # timed on logging steps only, the throughput monitor still counts every batch: its totals, and
    # its FLOPs against its tokens over the same window, are exact
    got = scalars(tmp_path / "lightning_logs" / "version_0")
    tokens_per_step = TINY_DATA["batch_size"] * TINY_DATA["seq_len"]
    assert got["train/lengths"] == {
        step: tokens_per_step * (step + 1) for step in range(LOG_EVERY - 1, STEPS, LOG_EVERY)
    }
    cfg = tiny_preset_config()
    flops_per_token = training_flops(cfg, TINY_DATA["seq_len"]) / TINY_DATA["seq_len"]
    rates = got["train/device/items_per_sec"]
    assert len(rates) == STEPS // LOG_EVERY - 1  # a window of two timed steps
    for step, items in rates.items():
        assert got["train/device/flops_per_sec"][step] / items == pytest.approx(
            flops_per_token, rel=1e-6
        )  # TensorBoard keeps float32
