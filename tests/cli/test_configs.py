"""Every preset in configs/, alone or stacked as the README documents: its effective values key by
key (so presets cannot drift apart), and that it instantiates the way the CLI uses it (on top of
configs/default.yaml), so no preset rots.

GPU presets are instantiated on the CPU (``--trainer.accelerator cpu --trainer.devices 1``), with the
test corpus and tokenizer instead of their real data; their model shapes are checked on the meta
device at the vocabulary size they ask for.
"""

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.strategies import ModelParallelStrategy

from modlm import ModelConfig, MoDTransformer
from modlm.cli.train import ModLMCLI
from modlm.training.callbacks import NonFiniteLossGuard
from modlm.training.callbacks.checkpointing import RunCheckpoint
from modlm.training.callbacks.preemption import Preemption
from modlm.training.module import MoDLightningModule
from modlm.training.trainer import ModLMTrainer
from tests.helpers import REPO, VAL_FRACTION

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
STRATEGIES = ("ddp.yaml", "fsdp.yaml")

# The effective values of every documented preset (and stack of presets), beyond the default run's:
# a preset that changes anything else, or stops changing one of these, fails here.
GPU = {
    "trainer.default_root_dir": "runs/gpu",
    "trainer.accelerator": "gpu",
    "trainer.devices": 1,
    "trainer.precision": "bf16-mixed",
    "trainer.max_steps": 20000,
    "trainer.val_check_interval": 1000,
    "trainer.log_every_n_steps": 50,
    "model.d_model": 512,
    "model.n_layers": 8,
    "model.n_heads": 8,
    "model.lr": 0.001,
    "model.warmup_steps": 500,
    "model.compile": True,
    "data.seq_len": 1024,
    "model.max_seq_len": 1024,
    "data.batch_size": 32,
    "data.vocab_size": 32768,
    "data.val_windows": 512,
    "data.num_workers": 4,
    "data.tokenizer_train_chars": 50_000_000,
    "checkpoint.every_n_train_steps": 1000,
}
ALL_GPUS = {"trainer.devices": -1}
FSDP2 = {
    "trainer.strategy": {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {
            "data_parallel_size": "auto",
            "tensor_parallel_size": "auto",
            "save_distributed_checkpoint": True,
        },
    }
}
PAPER60M = {
    "trainer.default_root_dir": "runs/paper60m",
    "trainer.max_steps": 30000,
    "model.n_layers": 14,
    "model.warmup_steps": 1000,
    "data.seq_len": 2048,
    "model.max_seq_len": 2048,
    "data.batch_size": 16,
    "data.tokenizer_train_chars": 100_000_000,
}
PAPER220M = {
    "trainer.default_root_dir": "runs/paper220m",
    "trainer.max_steps": 60000,
    "model.d_model": 1024,
    "model.n_layers": 15,
    "model.n_heads": 16,
    "model.lr": 0.0006,
    "model.warmup_steps": 2000,
    "data.seq_len": 2048,
    "model.max_seq_len": 2048,
    "data.batch_size": 8,
    "data.tokenizer_train_chars": 100_000_000,
}
SFT = {
    "trainer.default_root_dir": "runs/sft",
    "trainer.max_steps": 300,
    "model.route_every": 0,
    "model.router_weight": "2sigmoid",
    "model.capacity_start": 1.0,
    "model.capacity_steps": 150,
    "model.lr": 0.0001,
    "model.warmup_steps": 20,
}
PRESETS = {
    (): {},
    ("dense.yaml",): {"trainer.default_root_dir": "runs/dense", "model.route_every": 0},
    ("tiny.yaml",): {
        "trainer.default_root_dir": "runs/tiny",
        "trainer.precision": "32-true",
        "trainer.max_steps": 20,
        "trainer.val_check_interval": 10,
        "trainer.log_every_n_steps": 1,
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.capacity": 0.25,
        "model.warmup_steps": 5,
        "model.lr": 0.003,
        "data.seq_len": 32,
        "model.max_seq_len": 32,
        "data.batch_size": 4,
        "data.vocab_size": 512,
        "data.val_windows": 8,
        "data.num_workers": 0,
        "data.tokenizer_train_chars": 200_000,
        "checkpoint.every_n_train_steps": 10,
    },
    ("moe.yaml",): {"trainer.default_root_dir": "runs/moe", "model.route_every": 0, "model.n_experts": 4},
    ("mode_staged.yaml",): {"trainer.default_root_dir": "runs/mode_staged", "model.n_experts": 4},
    ("mode_integrated.yaml",): {
        "trainer.default_root_dir": "runs/mode_integrated",
        "model.route_every": 0,
        "model.n_experts": 4,
        "model.noop_experts": 4,
    },
    ("mor.yaml",): {
        "trainer.default_root_dir": "runs/mor",
        "model.route_every": 0,
        "model.n_layers": 8,
        "model.recursions": 3,
    },
    ("mor.yaml", "mor_dense.yaml"): {
        "trainer.default_root_dir": "runs/mor_dense",
        "model.route_every": 0,
        "model.n_layers": 8,
        "model.recursions": 3,
        "model.recursion_routing": "dense",
    },
    ("mor.yaml", "mor_shared_kv.yaml"): {
        "trainer.default_root_dir": "runs/mor_shared_kv",
        "model.route_every": 0,
        "model.n_layers": 8,
        "model.recursions": 3,
        "model.recursion_kv": "shared",
    },
    ("mor.yaml", "mor_token_choice.yaml"): {
        "trainer.default_root_dir": "runs/mor_token_choice",
        "model.route_every": 0,
        "model.n_layers": 8,
        "model.recursions": 3,
        "model.recursion_routing": "token_choice",
    },
    ("skip_attention.yaml",): {
        "trainer.default_root_dir": "runs/skip_attention",
        "model.route_part": "attention",
        "model.capacity": 0.25,
    },
    ("convert_full.yaml", "skip_attention.yaml"): {
        "trainer.default_root_dir": "runs/skip_attention",
        "trainer.max_steps": 200,
        "model.router_weight": "2sigmoid",
        "model.capacity_start": 1.0,
        "model.capacity_steps": 100,
        "model.lr": 0.0005,
        "model.warmup_steps": 20,
        "model.route_part": "attention",
        "model.capacity": 0.25,
    },
    ("convert_full.yaml",): {
        "trainer.default_root_dir": "runs/convert_full",
        "trainer.max_steps": 200,
        "model.router_weight": "2sigmoid",
        "model.capacity_start": 1.0,
        "model.capacity_steps": 100,
        "model.lr": 0.0005,
        "model.warmup_steps": 20,
    },
    ("convert_routers.yaml",): {
        "trainer.default_root_dir": "runs/convert_routers",
        "trainer.max_steps": 200,
        "model.tune": "routers",
        "model.router_weight": "2sigmoid",
        "model.capacity_start": 1.0,
        "model.capacity_steps": 100,
        "model.lr": 0.002,
        "model.warmup_steps": 20,
    },
    ("sft.yaml",): SFT,
    ("sft.yaml", "sft_lora.yaml"): {
        **SFT,
        "trainer.default_root_dir": "runs/sft_lora",
        "model.tune": "lora",
        "model.lr": 0.001,
    },
    ("gpu.yaml",): GPU,
    ("gpu.yaml", "ddp.yaml"): {**GPU, **ALL_GPUS, "trainer.strategy": "ddp"},
    ("gpu.yaml", "fsdp.yaml"): {**GPU, **ALL_GPUS, **FSDP2},
    ("gpu.yaml", "paper60m.yaml", "ddp.yaml"): {**GPU, **PAPER60M, **ALL_GPUS, "trainer.strategy": "ddp"},
    ("gpu.yaml", "paper220m.yaml", "fsdp.yaml"): {**GPU, **PAPER220M, **ALL_GPUS, **FSDP2},
}
# Presets that start from a pretrained model (--model.init_from), instantiated from a small transformers Llama.
PRETRAINED = {("sft.yaml", "sft_lora.yaml")}
# Parameter counts the presets promise (tied embeddings, at their own vocab_size).
PROMISED_PARAMS = {
    (): 7e6,
    ("gpu.yaml",): 42e6,
    ("gpu.yaml", "paper60m.yaml", "ddp.yaml"): 62e6,
    ("gpu.yaml", "paper220m.yaml", "fsdp.yaml"): 225e6,
}


def preset_id(files) -> str:
    return "+".join(f.removesuffix(".yaml") for f in files) or "default"


def config_args(files) -> list[str]:
    return [arg for name in files for arg in ("--config", str(REPO / "configs" / name))]


class ParseOnly(ModLMCLI):
    """The CLI's resolved config of some arguments, nothing instantiated."""

    def instantiate_classes(self) -> None:
        pass


def effective(files) -> dict:
    """Every resolved value of the model, data, trainer and checkpoint groups, by dotted key."""
    config = ParseOnly(args=config_args(files), run=False).config.as_dict()
    return {
        f"{group}.{key}": value
        for group in ("model", "data", "trainer", "checkpoint")
        for key, value in (config[group] or {}).items()
    }


def plain(value):
    """A value as it compares: tuples as lists; a class given by path with its constructor's
    defaults filled in, as the parser resolves it."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict) and "class_path" in value:
        import importlib
        import inspect

        module, name = value["class_path"].rsplit(".", 1)
        signature = inspect.signature(getattr(importlib.import_module(module), name))
        defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not p.empty}
        return {"class_path": value["class_path"], "init_args": {**defaults, **value.get("init_args", {})}}
    return value


@pytest.mark.parametrize("name", ["mor_dense.yaml", "mor_shared_kv.yaml", "mor_token_choice.yaml"])
def test_a_preset_that_stacks_on_another_is_refused_alone(name, tmp_path, capsys):
    """A recursion variant alone would train a plain MoD model whose recursion knob does nothing: the
    command line refuses it in one line that names the preset to stack it on."""
    from modlm.cli.train import main

    assert main(["fit", *config_args([name]), "--trainer.default_root_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "configs/mor.yaml" in err[0], err
    assert not any(tmp_path.iterdir()), "nothing is written"


def test_default_config_restates_no_code_default():
    """Each default has one source: default.yaml holds the trainer's settings, never a value the
    model, data or checkpoint classes already declare."""
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert set(default) == {"seed_everything", "trainer"}


def test_every_preset_file_is_covered_and_strategies_hold_only_a_strategy():
    assert {name for files in PRESETS for name in files} | {"default.yaml"} == {p.name for p in CONFIGS}
    for name in STRATEGIES:  # so a strategy cannot drift from the model it is stacked on
        values = yaml.safe_load((REPO / "configs" / name).read_text())
        assert set(values["trainer"]) == {"accelerator", "devices", "strategy"}, name
        assert set(values) <= {"trainer", "model"} and values.get("model", {}).keys() <= {"compile"}, name


@pytest.mark.parametrize("files", list(PRESETS), ids=[preset_id(f) for f in PRESETS])
def test_preset_effective_values(files):
    """Key by key, every value of a preset stack is the default run's except those it names."""
    baseline, got = effective(()), effective(files)
    assert got.keys() == baseline.keys()
    want = {**baseline, **PRESETS[files]}
    want["checkpoint.dirpath"] = f"{want['trainer.default_root_dir']}/checkpoints"  # the run's folder decides it
    for key in baseline:
        assert plain(got[key]) == plain(want[key]), key


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_tokenizer):
    from tests.helpers.pretrained import pretrained_folder

    return pretrained_folder(tmp_path_factory.mktemp("llama") / "llama", corpus=tiny_tokenizer[0])


@pytest.mark.parametrize("files", list(PRESETS), ids=[preset_id(f) for f in PRESETS])
def test_preset_instantiates(files, tmp_path, tiny_tokenizer, llama):
    """Model, data, trainer and callbacks build as the CLI builds them (GPU presets on the CPU, with
    the test corpus; fine-tuning presets from a small transformers Llama), and the model has the size the
    preset promises, on the meta device."""
    corpus, tokenizer = tiny_tokenizer
    want = {**effective(()), **PRESETS[files]}
    strategy = want["trainer.strategy"]
    start = ["--model.init_from", str(llama)] if files in PRETRAINED else ["--data.tokenizer", tokenizer]
    args = [
        *config_args(files),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--data.source",
        corpus,
        *start,
        "--data.val_fraction",
        VAL_FRACTION,
    ]
    if want["trainer.accelerator"] == "gpu":
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    cli = ModLMCLI(args=args, run=False)

    model = cli.model
    assert isinstance(model, MoDLightningModule)
    assert model.config.max_seq_len == want["data.seq_len"]
    if files in PRETRAINED:  # the checkpoint's vocabulary, which may be larger than its tokenizer's
        assert model.config.vocab_size == 416 >= cli.datamodule.tokenizer_vocab_size
        assert model.tuning.trained and all(".lora_" in k for k in model.tuning.trained)
    else:
        assert model.config.vocab_size == cli.datamodule.tokenizer_vocab_size
    assert cli.datamodule.batch_size == want["data.batch_size"]

    trainer = cli.trainer
    assert trainer.max_steps == want["trainer.max_steps"]
    assert Path(trainer.default_root_dir) == tmp_path
    for kind in (ModelCheckpoint, LearningRateMonitor, ThroughputMonitor, NonFiniteLossGuard, Preemption):
        assert sum(isinstance(cb, kind) for cb in trainer.callbacks) == 1, kind
    (ckpt,) = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    assert isinstance(ckpt, RunCheckpoint) and isinstance(trainer, ModLMTrainer)  # atomic saves, last.ckpt a link
    assert Path(ckpt.dirpath) == tmp_path / "checkpoints" and ckpt.save_last == "link"
    if isinstance(strategy, dict) and strategy["class_path"].endswith("ModelParallelStrategy"):
        assert isinstance(trainer.strategy, ModelParallelStrategy)

    fields = {
        k.removeprefix("model."): v
        for k, v in want.items()
        if k.startswith("model.") and k.removeprefix("model.") in ModelConfig.__dataclass_fields__
    }
    cfg = ModelConfig(**{**fields, "vocab_size": want["data.vocab_size"]})
    with torch.device("meta"):
        n = MoDTransformer(cfg).num_params()
    if files in PROMISED_PARAMS:
        assert n == pytest.approx(PROMISED_PARAMS[files], rel=0.05), n
