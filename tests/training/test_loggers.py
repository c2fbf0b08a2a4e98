"""Loggers other than TensorBoard, and the throughput monitor's switch (in the same runs).

Scalars are logged through Lightning, so a CSV logger must receive every one TensorBoard does;
what only TensorBoard's writer can take (histograms, the heat map image, the dashboard layout) is
skipped with exactly one warning.
"""

import csv
import json
import re
import warnings

import pytest

from modlm.cli.train import main
from tests.helpers import scalars, tiny_args

pytestmark = pytest.mark.slow  # each test trains a run through the command line

CSV = "lightning.pytorch.loggers.CSVLogger"
TENSORBOARD = "modlm.training.loggers.StreamTensorBoardLogger"
SKIPPED = "no TensorBoard logger"


def logger_arg(*class_paths: str, save_dir) -> str:
    loggers = [{"class_path": path, "init_args": {"save_dir": str(save_dir)}} for path in class_paths]
    return json.dumps(loggers if len(loggers) > 1 else loggers[0])


def csv_columns(root) -> set[str]:
    (path,) = root.glob("lightning_logs/version_*/metrics.csv")  # beside TensorBoard's version_0 it takes version_1
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    return set(header) - {"step", "epoch"}


def fit(root, tiny_tokenizer, *extra) -> list[str]:
    """Run a tiny fit; return the messages of modlm's skipped-output warnings."""
    args = tiny_args(
        root, tiny_tokenizer, "--trainer.max_steps", "10", "--routing_stats.histogram_every_n_steps", "5", *extra
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", *args]) == 0
    return [str(w.message) for w in caught if SKIPPED in str(w.message)]


def test_csv_logger_gets_every_scalar_and_one_warning_and_throughput_can_be_off(tmp_path, tiny_tokenizer):
    both = tmp_path / "both"
    assert fit(both, tiny_tokenizer, "--trainer.logger", logger_arg(TENSORBOARD, CSV, save_dir=both)) == []
    tensorboard_tags = set(scalars(both / "lightning_logs" / "version_0"))
    assert {
        "train/loss",
        "val/loss",
        "router/capacity_used/layer_1",
        "flops/step",
        "flops/measured_per_batch",
        "train/device/items_per_sec",
        "lr-AdamW/pg1",
    } <= tensorboard_tags
    assert csv_columns(both) == tensorboard_tags  # the same scalars, whichever logger

    alone = tmp_path / "csv"  # and without the throughput monitor, which the flag leaves out entirely
    told = fit(
        alone, tiny_tokenizer, "--throughput.enabled", "false", "--trainer.logger", logger_arg(CSV, save_dir=alone)
    )
    assert len(told) == 1 and "CSVLogger" in told[0] and "histograms" in told[0] and "heat map" in told[0]
    dropped = tensorboard_tags - csv_columns(alone)
    assert csv_columns(alone) <= tensorboard_tags and "train/device/items_per_sec" in dropped
    assert all(re.fullmatch(r"(train|val)/(time|batches|samples|lengths|device/\w+)", tag) for tag in dropped), dropped
    assert not list(alone.rglob("events.out.tfevents.*"))


def test_hyperparameters_are_model_and_data_and_fill_the_hparams_tab(tmp_path, tiny_tokenizer):
    """``hparams.yaml`` and TensorBoard's HParams tab hold the run's hyperparameters as ``model/...``
    and ``data/...`` (no internal keys), and the tab declares the validation losses as its metrics."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    fit(tmp_path, tiny_tokenizer)
    version = tmp_path / "lightning_logs" / "version_0"
    saved = yaml.safe_load((version / "hparams.yaml").read_text())
    assert {key.split("/")[0] for key in saved} == {"model", "data"}
    assert saved["model/capacity"] == 0.25 and saved["data/seq_len"] == 32 and saved["data/source"] == tiny_tokenizer[0]

    events = EventAccumulator(str(version))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == [
        "val/loss",
        "val/ppl",
        "val/loss_causal",
        "val/ppl_causal",
        "train/loss",
    ]
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model/capacity"].number_value == 0.25
    assert start.hparams["data/source"].string_value == tiny_tokenizer[0]
    assert start.hparams["trainer/max_steps"].number_value == 10
    unset = {key for key, value in saved.items() if value is None}  # TensorBoard's table has no "none"
    assert set(start.hparams) == (set(saved) - unset) | {"trainer/max_steps", "trainer/precision"}
