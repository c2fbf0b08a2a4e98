"""Every config in configs/ parses and instantiates (model, data, trainer, callbacks), the way the
CLI would use it (on top of configs/default.yaml), so no preset rots.

GPU presets are instantiated on the CPU (``--trainer.accelerator cpu --trainer.devices 1``), with the
test corpus and tokenizer instead of their real data; their model shapes are checked on the meta
device at the vocabulary size they ask for.
"""
import inspect
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from modlm import ModelConfig, MoDTransformer
from modlm.training.callbacks import NonFiniteLossGuard
from modlm.training.callbacks.checkpointing import RunCheckpoint
from modlm.training.callbacks.preemption import Preemption
from modlm.cli.train import ModLMCLI
from modlm.data import ModLMDataModule
from modlm.training.module import MoDLightningModule
from modlm.training.parallel import block_policy
from tests.helpers import REPO, VAL_FRACTION

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# Parameter counts the preset files promise (tied embeddings, at their own vocab_size).
PROMISED_PARAMS = {"paper60m.yaml": 62e6, "paper220m.yaml": 225e6, "default.yaml": 7e6}


def code_defaults(cls) -> dict:
    return {name: p.default for name, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


def merged(path: Path) -> dict:
    """The data module's defaults, then default.yaml, then ``path``, one level deep per group (what
    the CLI does; the model's defaults stay implicit, ``ModelConfig`` applies them)."""
    out = {"model": {}, "data": code_defaults(ModLMDataModule)}
    for config in (REPO / "configs" / "default.yaml", path):
        for group, values in (yaml.safe_load(config.read_text()) or {}).items():
            out[group] = {**out.get(group, {}), **values} if isinstance(values, dict) else values
    return out


def test_default_config_restates_no_code_default():
    """Each default has one source: default.yaml holds the trainer's settings, never a value the
    model, data or checkpoint classes already declare."""
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert set(default) == {"seed_everything", "trainer"}


def test_there_are_presets():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "dense.yaml", "tiny.yaml", "gpu.yaml", "ddp.yaml", "fsdp.yaml", "fsdp1.yaml",
            "paper60m.yaml", "paper220m.yaml", "moe.yaml", "mode_staged.yaml", "mode_integrated.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_instantiates(path, tmp_path, tiny_tokenizer):
    corpus, tokenizer = tiny_tokenizer
    want = merged(path)
    strategy = want["trainer"].get("strategy")
    args = ["--config", str(path), "--trainer.default_root_dir", str(tmp_path),
            "--data.source", corpus, "--data.tokenizer_path", tokenizer, "--data.val_fraction", VAL_FRACTION]
    if want["trainer"].get("accelerator") == "gpu":
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    if isinstance(strategy, dict) and strategy["class_path"].endswith("FSDPStrategy"):
        # Lightning's FSDPStrategy refuses CPUs: instantiate the strategy alone, the rest without it.
        args += ["--trainer.strategy", "auto"]
        _check_fsdp1_strategy(strategy["init_args"])
    cli = ModLMCLI(args=args, run=False)

    model = cli.model
    assert isinstance(model, MoDLightningModule)
    for key, value in want["model"].items():
        got = model.hparams[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert model.config.max_seq_len == want["data"]["seq_len"]
    assert model.config.vocab_size == cli.datamodule.tokenizer_vocab_size
    assert cli.datamodule.batch_size == want["data"]["batch_size"]

    trainer = cli.trainer
    assert trainer.max_steps == want["trainer"]["max_steps"]
    assert Path(trainer.default_root_dir) == tmp_path
    for kind in (ModelCheckpoint, LearningRateMonitor, ThroughputMonitor, NonFiniteLossGuard, Preemption):
        assert sum(isinstance(cb, kind) for cb in trainer.callbacks) == 1, kind
    # the checkpoint callback writes atomically and keeps last.ckpt a link
    assert any(isinstance(cb, RunCheckpoint) for cb in trainer.callbacks)
    (ckpt,) = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    assert Path(ckpt.dirpath) == tmp_path / "checkpoints" and ckpt.save_last == "link"
    if isinstance(strategy, dict) and strategy["class_path"].endswith("ModelParallelStrategy"):
        assert isinstance(trainer.strategy, ModelParallelStrategy)

    # The shape the preset promises, at its own vocabulary size (meta device: no memory).
    fields = {k: v for k, v in want["model"].items() if k in ModelConfig.__dataclass_fields__}
    cfg = ModelConfig(**{**fields, "vocab_size": want["data"]["vocab_size"], "max_seq_len": want["data"]["seq_len"]})
    with torch.device("meta"):
        n = MoDTransformer(cfg).num_params()
    if path.name in PROMISED_PARAMS:
        assert n == pytest.approx(PROMISED_PARAMS[path.name], rel=0.05), n


def _check_fsdp1_strategy(init_args: dict) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(FSDPStrategy, "strategy", fail_untyped=False)
    strategy = parser.instantiate(parser.parse_object({"strategy": init_args})).strategy
    assert strategy.kwargs["auto_wrap_policy"] is block_policy
