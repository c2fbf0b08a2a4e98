"""Shared pieces of the tests: the tiny run's arguments, running train.py, reading logs, counting FLOPs.

Test modules import them as ``tests.helpers`` (pytest puts the repository root on ``sys.path``,
since ``tests`` is a package); the tokenizer tiny runs train on is the ``tiny_tokenizer`` fixture of
``conftest.py``. Callbacks that subprocesses load by name are in ``tests.helpers.callbacks``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The tiny preset's data settings; conftest.py's tokenizer is trained on them once per session.
TINY_DATA = dict(seq_len=32, batch_size=4, vocab_size=512, val_windows=8, tokenizer_train_chars=200_000)
VAL_FRACTION = "0.2"  # the small corpus needs a larger share to give a non-empty validation split


def free_port() -> int:
    """A TCP port nothing listens on now, so that two test suites on one machine do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_run(root: Path) -> list[str]:
    """CLI arguments every in-test run starts with: its outputs under ``root``, no progress bar, no summary."""
    return [
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]


def exact_fit(root: Path, every: int) -> list[str]:
    """``quiet_run`` in fp32 (exact comparisons), a log every step, validation and a checkpoint every
    ``every`` steps: the short fits from a pretrained folder."""
    return [
        *quiet_run(root),
        "--trainer.precision",
        "32-true",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.val_check_interval",
        str(every),
        "--checkpoint.every_n_train_steps",
        str(every),
    ]


def tiny_args(root: Path, data: tuple[str, str], *extra: str) -> list[str]:
    """CLI arguments of a tiny run on the ``tiny_tokenizer`` corpus, every output under ``root``."""
    corpus, tokenizer = data
    return [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        *quiet_run(root),
        "--data.source",
        corpus,
        "--data.val_fraction",
        VAL_FRACTION,
        "--data.tokenizer",
        tokenizer,
        *extra,
    ]


def run_train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a subprocess (from the repository root)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # A fixed port left in the environment by an in-process test may be taken by another program;
    # without one, Lightning's launcher picks a free port.
    env.pop("MASTER_PORT", None)
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


RUN_LINES = [
    re.compile(p)
    for p in (
        r"Seed set to \d+",
        r"modlm: precision \S+ on \d+ \w+ device\(s\) \(.+\)",
        r"modlm: checkpoints in \S+; TensorBoard logs in \S+/lightning_logs/version_\d+ \(tensorboard --logdir \S+\)",
        r"modlm: resuming from step \d+ of \S+\.ckpt",
        r"`Trainer\.fit` stopped: `max_steps=\d+` reached\.",
        # Lightning's model summary
        r"\| Name +\| Type +\| Params +\| Mode +\| FLOPs",
        r"-+",
        r"\d+ +\| \w+ +\| \w+ +\| [\d.]+ ?[KMGT]? +\| (train|eval) +\| [\d.]+ ?[KMGTP]?",
        r"[\d.]+ ?[KMGT]? +(Trainable params|Non-trainable params|Total params|Total estimated model params size \(MB\)"
        r"|Modules in train mode|Modules in eval mode|Total Flops)",
        # the progress bars
        r"(Training step|Validation|Validation DataLoader 0): .*",
    )
]
"""Every line a tiny run prints: each one about the run (its seed, precision, folders, resume, model,
progress, end)."""


def unexpected_lines(output: str) -> list[str]:
    """The lines of a run's stdout + stderr that no pattern of ``RUN_LINES`` accounts for (progress
    bars redraw with carriage returns and cursor moves, so those split lines too)."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output)
    lines = [line.strip() for line in re.split(r"[\r\n]", text)]
    return [line for line in lines if line and not any(p.fullmatch(line) for p in RUN_LINES)]


def tiny_preset_config():
    """The ``ModelConfig`` a run of configs/tiny.yaml builds on the tiny data (written out, not read from
    the preset: the tests check the preset against it)."""
    from modlm import ModelConfig

    return ModelConfig(
        vocab_size=TINY_DATA["vocab_size"],
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=TINY_DATA["seq_len"],
        capacity=0.25,
    )


def fit_events(root: Path, args: list[str]):
    """``train.py fit ARGS`` in this process, then its one TensorBoard folder under ``root`` read whole
    (an ``EventAccumulator``: scalars, histograms, images, tensors)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from modlm.cli.train import main as train_main

    assert train_main(["fit", *args]) == 0
    (log_dir,) = list(root.glob("lightning_logs/version_*"))
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def logged(acc, tag: str) -> list[float]:
    """The values of one scalar tag of an ``EventAccumulator``, in order."""
    return [e.value for e in acc.Scalars(tag)]


def scalars(version_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a TensorBoard run folder: ``{tag: {step: value}}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(version_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def counted_flops(cfg, seq_len: int, backward: bool, batch: int = 2) -> int:
    """FLOPs torch counts for a forward (and backward) of a top-k pass, on a meta-device model: there
    torch counts ``scaled_dot_product_attention``; on real CPU tensors it counts nothing for it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from modlm import MoDTransformer

    with torch.device("meta"):
        model = MoDTransformer(cfg)
        idx = torch.zeros(batch, seq_len, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(idx, routing="topk")
        if backward:
            (out.logits.sum() + out.aux_loss).backward()
    return counter.get_total_flops()


def assert_same_losses_after_resume(want: dict, got: dict, killed_at: int, steps: int, first_logged: int = 0) -> None:
    """The run's one version folder (the killed run's, which the resumed run goes on in) holds one
    continuous curve, steps ``first_logged..steps-1`` (``killed_at..``: a checkpoint resumed in a
    folder of its own, with no logs before it); from ``killed_at`` on, the resumed run logged them,
    and the final validation, as the uninterrupted one did."""
    import pytest

    assert set(got["train/loss"]) == set(range(first_logged, steps))
    for step in range(killed_at, steps):
        assert got["train/loss"][step] == pytest.approx(want["train/loss"][step], abs=1e-6, rel=0), step
    assert got["val/loss"][steps - 1] == pytest.approx(want["val/loss"][steps - 1], abs=1e-6, rel=0)
