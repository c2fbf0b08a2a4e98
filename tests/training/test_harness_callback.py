"""``--harness.tasks``: lm-evaluation-harness scores in TensorBoard while training, every N steps,
off by default; a wrong task name stops the run before its first step."""

from __future__ import annotations

import pytest

from modlm.cli.train import main as train_main
from modlm.training import tags
from tests.helpers import scalars, tiny_args
from tests.helpers.harness_tasks import write_tasks

pytestmark = pytest.mark.slow


def test_scores_land_in_tensorboard_every_n_steps(tmp_path, tiny_tokenizer):
    folder = write_tasks(tmp_path / "tasks", questions=6, chars=200)
    args = tiny_args(
        tmp_path / "run",
        tiny_tokenizer,
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "4",
        "--harness.tasks",
        "[docstring_mc, stdlib_ppl]",
        "--harness.include_path",
        str(folder),
        "--harness.every_n_steps",
        "2",
        "--harness.limit",
        "4",
    )
    assert train_main(["fit", *args]) == 0
    logged = scalars(next((tmp_path / "run" / "lightning_logs").iterdir()))
    for metric in ("acc", "acc_norm", "capacity_used"):
        assert set(logged[tags.harness("docstring_mc", metric)]) == {2, 4}, metric
    for metric in ("word_perplexity", "bits_per_byte"):
        assert set(logged[tags.harness("stdlib_ppl", metric)]) == {2, 4}, metric
    assert 0 <= logged[tags.harness("docstring_mc", "acc")][4] <= 1
    assert 0 < logged[tags.harness("stdlib_ppl", "capacity_used")][4] < 1  # the tiny model routes 25% of tokens
    bits = logged[tags.harness("stdlib_ppl", "bits_per_byte")]
    assert bits[4] < bits[2]  # the model learns between two scorings


def test_off_by_default_and_a_wrong_name_stops_the_run_at_once(tmp_path, tiny_tokenizer, capsys):
    args = tiny_args(tmp_path / "run", tiny_tokenizer, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2")
    assert train_main(["fit", *args]) == 0
    logged = scalars(next((tmp_path / "run" / "lightning_logs").iterdir()))
    assert not [tag for tag in logged if tag.startswith("harness/")]
    folder = write_tasks(tmp_path / "tasks", questions=4, chars=200)
    wrong = tiny_args(
        tmp_path / "wrong", tiny_tokenizer, "--harness.tasks", "[docstring_mcq]", "--harness.include_path", str(folder)
    )
    assert train_main(["fit", *wrong]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'docstring_mcq'" in err and "closest: docstring_mc" in err
    assert not (tmp_path / "wrong" / "checkpoints").exists() or not any((tmp_path / "wrong" / "checkpoints").iterdir())
