"""What a run prints: only lines about the run (its precision, folders, resume, model summary with
FLOPs, progress in optimizer steps), none of Lightning's advertisements, accelerator lists or
upstream deprecations, and modlm's own warnings as one line each."""

import logging
import re
import warnings

import pytest

from modlm.analysis.flops import forward_flops
from modlm.cli.output import format_warning, run_output
from modlm.model.config import ModelConfig
from tests.helpers import run_train, tiny_args, unexpected_lines


@pytest.mark.slow
def test_a_tiny_run_prints_only_lines_about_the_run(tmp_path, tiny_tokenizer):
    import torch
    from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

    root = tmp_path / "run"
    done = run_train(
        "fit",
        *tiny_args(
            root,
            tiny_tokenizer,
            "--trainer.max_steps",
            "10",
            "--trainer.enable_progress_bar",
            "true",
            "--trainer.enable_model_summary",
            "true",
        ),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert unexpected_lines(output) == []
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines()]
    assert "modlm: precision 32-true on 1 cpu device(s) (set by --trainer.precision or a config)" in lines
    where = [line for line in lines if line.startswith("modlm: checkpoints in")]
    assert where == [
        f"modlm: checkpoints in {root / 'checkpoints'}; TensorBoard logs in "
        f"{root / 'lightning_logs' / 'version_0'} (tensorboard --logdir {root / 'lightning_logs'})"
    ]
    # the bar reads the loss where it refreshes (every log_every_n_steps, 1 here, and the last step)
    assert any(
        line.startswith("Training step: 100%") and "10/10" in line and re.search(r"train/loss=\d+\.\d{3}", line)
        for line in lines
    ), lines
    # the summary's FLOPs: the analytic forward FLOPs of one training batch (4 windows of 32 tokens)
    hparams = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    flops = forward_flops(ModelConfig.from_hparams(hparams), 32) * 4
    assert f"{get_human_readable_count(flops)} Total Flops" in [" ".join(line.split()) for line in lines]


def test_lightning_notes_are_dropped_by_message_and_the_rest_kept(caplog):
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"), run_output():
        for message in (
            "💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger",
            "GPU available: False, used: False",
            "TPU available: False, using: 0 TPU cores",
            "Using bfloat16 Automatic Mixed Precision (AMP)",
            "Restoring states from the checkpoint path at x.ckpt",
            "Restored all states from the checkpoint at x.ckpt",
            "`Trainer.fit` stopped: `max_steps=10` reached.",
            "GPU available but not used.",
        ):
            log.info(message)
    assert [r.getMessage() for r in caplog.records] == [
        "`Trainer.fit` stopped: `max_steps=10` reached.",
        "GPU available but not used.",
    ]
    log.info("GPU available: False, used: False")  # outside the block: Lightning's notes as they were
    assert caplog.records[-1].getMessage() == "GPU available: False, used: False"


def test_only_the_named_upstream_warning_is_silenced():
    def warn(message, category=FutureWarning, module="lightning.pytorch.utilities._pytree"):
        warnings.warn_explicit(message, category, "_pytree.py", 21, module=module)

    leafspec = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with run_output():
            warn(leafspec)
            warn("another deprecation of the same module")
            warn(leafspec, module="somebody.else")
            warn(leafspec, category=DeprecationWarning)
        warn(leafspec)
    assert [(str(w.message)[:20], w.category) for w in caught] == [
        ("another deprecation ", FutureWarning),
        (leafspec[:20], FutureWarning),
        (leafspec[:20], DeprecationWarning),
        (leafspec[:20], FutureWarning),
    ]


def test_modlm_warnings_are_one_line_and_others_keep_pythons_format():
    import modlm.training.module as module

    ours = format_warning(
        "modlm: the LR schedule restored from the checkpoint spans 10 steps",
        UserWarning,
        module.__file__,
        174,
        "    rank_zero_warn(",
    )
    assert ours == "modlm: warning: the LR schedule restored from the checkpoint spans 10 steps\n"
    theirs = format_warning("the user's own warning", UserWarning, "/home/me/train_more.py", 3, "warnings.warn(x)")
    assert theirs == warnings.formatwarning(
        "the user's own warning", UserWarning, "/home/me/train_more.py", 3, "warnings.warn(x)"
    )
    assert "train_more.py:3" in theirs
    with run_output():
        assert warnings.formatwarning is format_warning
    assert warnings.formatwarning is not format_warning
