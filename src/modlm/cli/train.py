"""The command line: ``python train.py fit|validate|test`` (a ``LightningCLI``).

What it adds to plain LightningCLI:

* the package's ``configs/default.yaml`` (``configs/`` in a checkout links to it) is read first,
  so ``python train.py fit`` (or ``modlm-train fit``) alone trains the default MoD model on the
  default corpus; ``--config FILE`` (repeatable) overrides it.
* data and model arguments are linked: the model's ``vocab_size`` is the tokenizer's, its
  ``max_seq_len`` the data's ``seq_len``; nobody keeps two numbers in step.
* callbacks: ``--checkpoint.*`` (``ModelCheckpoint``, each save written atomically: one every N
  steps and ``last.ckpt``, a link to the newest, in ``<default_root_dir>/checkpoints`` so
  ``--ckpt_path last`` finds it from any later run), ``--preemption.*`` (SIGUSR1/SIGTERM: every rank
  saves at the next step boundary), ``--throughput.*`` (``ThroughputMonitor`` in tokens,
  ``enabled: false`` to drop it), ``--lr_monitor.*``, the routing / FLOPs telemetry
  (``--routing_stats.*``, ``--flops.*``, ``--routing_heatmap.*``), the dashboard layout
  (``--dashboard.*``), lm-evaluation-harness scores every N steps (``--harness.tasks``, off by
  default), plus ``default_callbacks()`` (the non-finite loss guard).
* ``--ckpt_path last`` means the newest checkpoint of the run, whichever callback wrote it; a
  damaged one is named, with the newest intact one to use instead. A fit resumed from a checkpoint
  of its own folder logs into the same TensorBoard version folder (one curve per tag).
* what a run prints: one line each for the precision (and why), where checkpoints and logs go, and
  the checkpoint a run resumes from (its step); the model summary with analytic FLOPs; a progress bar
  in optimizer steps; none of Lightning's notes that are not about the run (``modlm.cli.output``).
* user errors end with one line on stderr and a non-zero exit, no traceback (``main``); so does a
  mistyped flag, with the closest valid names.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import jsonargparse
import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from ..model.config import ModelConfig
from ..model.errors import UserError, run_command
from ..saved import CheckpointError, is_checkpoint, read_checkpoint, read_sharded_meta, saved_data, unpack_saved
from ..training.callbacks import NonFiniteLossError, NonFiniteLossGuard
from ..training.callbacks.checkpointing import RunCheckpoint, in_folder, saved_log_version
from ..training.callbacks.dashboard import Dashboard
from ..training.callbacks.flops_meter import FlopsMeter
from ..training.callbacks.harness import HarnessScores
from ..training.callbacks.preemption import Preemption
from ..training.callbacks.progress import StepProgressBar
from ..training.callbacks.routing_heatmap import RoutingHeatmap
from ..training.callbacks.routing_stats import RoutingStats
from ..training.callbacks.summary import FlopsModelSummary
from ..training.callbacks.throughput import TokenThroughput
from ..training.checkpoint import check_resume_shape, resolve_last
from ..training.loggers import StreamTensorBoardLogger
from ..training.module import MoDLightningModule
from ..training.parallel import end_process_group
from ..training.precision import choose_precision
from ..training.trainer import ModLMTrainer
from .output import run_output
from .usage import UsageError, explain, option_names

# ``--help`` shows every ``ModelConfig`` field's attribute docstring (the module forwards
# ``**model_config`` to it); jsonargparse reads attribute docstrings only when asked.
jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
"""The presets, shipped inside the package (the repository's top-level ``configs/`` links here)."""
DEFAULT_CONFIG = CONFIGS_DIR / "default.yaml"
"""The config ``python train.py fit`` (or ``modlm-train fit``) reads first, from any directory."""

SUBCOMMANDS = ("fit", "validate", "test")


def default_callbacks() -> list[pl.Callback]:
    """What every run gets besides ``ModelCheckpoint``, ``LearningRateMonitor``, the telemetry and
    throughput (configurable groups below), the progress bar and the model summary (unless the
    trainer's flags turn them off, or ``--trainer.callbacks`` names its own)."""
    return [NonFiniteLossGuard()]


def display_callbacks(trainer_config: dict) -> list[pl.Callback]:
    """modlm's progress bar (optimizer steps of ``max_steps``) and model summary (analytic FLOPs),
    where the trainer shows them and the user's ``--trainer.callbacks`` bring none of their own."""
    given = trainer_config.get("callbacks") or []
    given = given if isinstance(given, list) else [given]
    found = []
    if trainer_config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
        found.append(StepProgressBar())
    if trainer_config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in given):
        found.append(FlopsModelSummary())
    return found


def _datamodule_class():
    from ..data import ModLMDataModule

    return ModLMDataModule


class ModLMCLI(LightningCLI):
    """LightningCLI with modlm's defaults; see the module docstring."""

    def __init__(
        self,
        args=None,
        run: bool = True,
        datamodule_class=None,
        default_config: Optional[Path] = DEFAULT_CONFIG,
        **kwargs,
    ):
        defaults = [str(default_config)] if default_config is not None and Path(default_config).is_file() else []
        self._resumed: Optional[dict] = None  # what --ckpt_path holds (its step, its callbacks' state)
        self._precision_why: Optional[str] = None  # set where modlm chose the precision
        # With subcommands each one reads the default config; run=False has a single parser.
        # exit_on_error off: a refused command line becomes one line (parse_arguments), not the usage.
        if run:
            parser_kwargs = {cmd: {"default_config_files": defaults, "exit_on_error": False} for cmd in SUBCOMMANDS}
            parser_kwargs["exit_on_error"] = False
        else:
            parser_kwargs = {"default_config_files": defaults, "exit_on_error": False}
        super().__init__(
            MoDLightningModule,
            datamodule_class or _datamodule_class(),
            trainer_class=ModLMTrainer,  # Lightning's Trainer, its checkpoints written atomically
            args=args,
            run=run,
            auto_configure_optimizers=False,  # the module owns AdamW + schedule (--model.lr ...)
            save_config_kwargs={"overwrite": True},  # a requeued run with a fixed version dir resaves it
            parser_kwargs=parser_kwargs,
            trainer_defaults={"callbacks": default_callbacks()},
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # ModelCheckpoint's arguments and behaviour (each save atomic: the trainer writes it).
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "{step:07d}",
                "checkpoint.save_last": "link",  # last.ckpt: a link to the newest step checkpoint, not a copy
                "checkpoint.save_top_k": -1,
                "checkpoint.every_n_train_steps": 100,
            }
        )
        parser.add_lightning_class_args(Preemption, "preemption")  # SIGUSR1/SIGTERM: save at a step boundary
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        # Routing and FLOPs telemetry: always on, tuned with --routing_stats.*, --flops.*,
        # --routing_heatmap.*.
        parser.add_lightning_class_args(RoutingStats, "routing_stats")
        parser.add_lightning_class_args(FlopsMeter, "flops")
        parser.add_lightning_class_args(RoutingHeatmap, "routing_heatmap")
        parser.add_lightning_class_args(Dashboard, "dashboard")
        parser.add_lightning_class_args(TokenThroughput, "throughput")
        parser.add_lightning_class_args(HarnessScores, "harness")  # lm-eval tasks every N steps; off without tasks
        # The model reads the vocabulary size from the tokenizer the data module trains or loads
        # (at instantiation, since the tokenizer may not exist before), and its longest sequence
        # from the training windows.
        data_cls = self.datamodule_class
        if hasattr(data_cls, "tokenizer_vocab_size"):
            parser.link_arguments("data.tokenizer_vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.max_seq_len")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then settle ``--ckpt_path`` before LightningCLI reads the checkpoint's
        hyperparameters into the model's config: ``last`` becomes the newest checkpoint of the run
        (or nothing), a missing or damaged file is a one-line error, and a fit whose model shape
        differs from the checkpoint's is refused naming the fields (LightningCLI would silently take
        the checkpoint's values over the ``--model.*`` the user gave: for ``validate``/``test`` that
        is what one wants, the checkpoint defines the model; for ``fit`` the user asked for another
        model than the one they resume). ``validate``/``test`` take the data's shape from the
        checkpoint too (``_data_from_checkpoint``); a checkpoint named as ``--data.tokenizer`` means
        its tokenizer. A command line the parser refuses is a one-line ``UsageError`` naming the
        closest valid flags."""
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            raise self._usage_error(parser, args, err) from None
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = config.ckpt_path = self._resolve_last(config)
        if ckpt_path and not Path(ckpt_path).exists():
            raise CheckpointError(f"checkpoint not found: {ckpt_path}")
        if ckpt_path and Path(ckpt_path).is_file():
            saved = read_checkpoint(ckpt_path)  # a corrupt or unsafe file is a one-line user error
            if subcommand == "fit":
                check_resume_shape(ckpt_path, config.model)
        elif ckpt_path:  # a sharded folder: LightningCLI reads only files' hyperparameters
            saved = read_sharded_meta(Path(ckpt_path))
            if subcommand != "fit":
                hparams = dict(saved.get("hyper_parameters") or {})
                hparams.pop("_instantiator", None)
                self.config = parser.parse_object({subcommand: {"model": hparams}}, self.config)
                config = self.config[subcommand]
        if ckpt_path:
            self._resumed = saved
            what = {"fit": "resuming from", "validate": "validating", "test": "testing"}[subcommand]
            rank_zero_info(f"modlm: {what} step {saved.get('global_step')} of {ckpt_path}")
        tokenizer = config.data.get("tokenizer")
        if tokenizer and is_checkpoint(tokenizer):
            config.data.tokenizer = str(self._unpack(tokenizer, config, windows=False))
        if ckpt_path and subcommand in ("validate", "test"):
            self._data_from_checkpoint(parser, subcommand, ckpt_path)

    def _data_from_checkpoint(self, parser, subcommand: str, ckpt_path: str) -> None:
        """``validate``/``test`` from a checkpoint: the data's shape (window length, vocabulary,
        number of windows) and tokenizer are the checkpoint's unless given on the command line or in
        a config file, and the data is the validation windows stored in it unless ``--data.source``
        names a corpus (tokenized with the checkpoint's tokenizer then). A checkpoint from before
        checkpoints carried their data falls back on its data settings, source included."""
        config = self.config[subcommand]
        defaults = parser.parse_args([subcommand])[subcommand].data  # what "not given" looks like
        given = {
            key
            for key in ("source", "seq_len", "vocab_size", "val_windows", "tokenizer")
            if config.data.get(key) != defaults.get(key)
        }
        settings, tokenizer, windows = saved_data(ckpt_path)
        if tokenizer is not None:
            settings["tokenizer"] = str(self._unpack(ckpt_path, config, windows=False))
            if windows is not None:
                settings["source"] = str(self._unpack(ckpt_path, config, windows=True))
                settings["val_windows"] = len(windows)
        for key in ("source", "seq_len", "vocab_size", "val_windows", "tokenizer"):
            if key not in given and key in settings:
                config.data[key] = settings[key]

    def _usage_error(self, parser: LightningArgumentParser, args, err: argparse.ArgumentError) -> UsageError:
        """The parser's refusal as one line: unknown flags with the closest ones of the subcommand."""
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        subparsers = getattr(self, "_subcommand_parsers", {})
        subcommand = next((a for a in argv if a in subparsers), None)
        target = subparsers.get(subcommand, parser)
        prog = os.path.basename(sys.argv[0]) or "train.py"
        command = f"{prog} {subcommand}" if subcommand else prog
        return UsageError(
            explain(
                str(err),
                option_names(target),
                f"{command} --help lists every option",
                choices={"subcommand": list(subparsers)} if subparsers else None,
            )
        )

    @staticmethod
    def _unpack(ckpt_path: str, config, windows: bool) -> Path:
        """The checkpoint's tokenizer and chat template (and, with ``windows``, its validation windows and
        their loss mask) as a prepared folder in the run's tokenizer cache: what ``--data.tokenizer`` /
        ``--data.source`` name."""
        return unpack_saved(ckpt_path, config.data.get("cache_dir"), windows)

    @classmethod
    def subcommands(cls) -> dict[str, set[str]]:
        """fit, validate and test (``predict`` is not offered: generation is ``modlm-generate``)."""
        return {name: keys for name, keys in super().subcommands().items() if name != "predict"}

    @staticmethod
    def _resolve_last(config) -> Optional[str]:
        """``last`` -> the newest checkpoint of the run, whichever callback wrote it (``last.ckpt``, a
        periodic one, the pre-emption save, Lightning's ``hpc_ckpt_N.ckpt``); None before the first."""
        root = config.trainer.get("default_root_dir") or os.getcwd()
        folder = config.checkpoint.get("dirpath") or os.path.join(root, "checkpoints")
        newest = resolve_last(folder, root)
        if newest is None:
            rank_zero_info(f"modlm: --ckpt_path last: no checkpoint in {folder} yet, starting afresh")
            return None
        return str(newest)  # parse_arguments says which step it holds

    def instantiate_trainer(self, **kwargs):
        # Where the user names no logger, Lightning would make a TensorBoardLogger under
        # default_root_dir; make the same one minus the cards that never change (epoch, hp_metric).
        # A fit resumed from its own checkpoint folder goes on in the version folder it logged to,
        # where TensorBoard hides what was logged after the checkpoint's step (purge_step).
        trainer = self._get(self.config_init, "trainer", default={})
        config = self.config[self.subcommand] if self.subcommand else self.config
        if trainer.get("logger") in (None, True):
            resumed = {}
            if (
                self.subcommand == "fit"
                and self._resumed
                and in_folder(config.get("ckpt_path"), config.checkpoint.dirpath)
            ):
                version = saved_log_version(self._resumed)
                if version is not None:
                    resumed = {"version": version, "purge_step": self._resumed.get("global_step")}
            kwargs.setdefault(
                "logger", StreamTensorBoardLogger(save_dir=trainer.get("default_root_dir") or os.getcwd(), **resumed)
            )
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": default_callbacks() + display_callbacks(trainer)}
        built = super().instantiate_trainer(**kwargs)
        # --throughput.enabled false: leave the monitor out entirely (nothing of it runs)
        built.callbacks[:] = [cb for cb in built.callbacks if not (isinstance(cb, TokenThroughput) and not cb.enabled)]
        self._announce(built, config)
        return built

    def _announce(self, trainer: pl.Trainer, config) -> None:
        """The run's two lines: its precision (with why) and device, and where its outputs go."""
        kind = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
        devices = f"{trainer.num_devices * trainer.num_nodes} {kind}"
        why = self._precision_why or "set by --trainer.precision or a config"
        rank_zero_info(f"modlm: precision {trainer.precision} on {devices} device(s) ({why})")
        where = []
        if self.subcommand == "fit" and trainer.checkpoint_callback is not None:
            where.append(f"checkpoints in {config.checkpoint.dirpath}")
        logger = trainer.logger
        if isinstance(logger, StreamTensorBoardLogger) and trainer.is_global_zero:
            where.append(f"TensorBoard logs in {logger.log_dir} (tensorboard --logdir {logger.root_dir})")
        elif logger is not None:
            where.append(f"logs by {type(logger).__name__} in {logger.log_dir or logger.save_dir}")
        if where:
            rank_zero_info("modlm: " + "; ".join(where))

    def before_instantiate_classes(self) -> None:
        # Keep checkpoints at one fixed place under the run's root directory (Lightning's default is
        # inside the logger's version_N folder, a new one per run, where `--ckpt_path last` would
        # never find the previous run's last.ckpt).
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("precision") is None:  # not named anywhere: pick what this machine runs fast
            config.trainer.precision, why = choose_precision(config.trainer.get("accelerator") or "auto")
            self._precision_why = f"chosen automatically: {why}; --trainer.precision overrides"
        if config.checkpoint.dirpath is None:
            root = config.trainer.default_root_dir or os.getcwd()
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        if config.model.get("init_from") and not config.data.get("tokenizer"):
            config.data.tokenizer = config.model.init_from  # a pretrained model reads its own tokenizer
        if not config.model.get("init_from"):  # a bad model value is named before the data's tokenizer is trained
            model = config.model.as_dict() if hasattr(config.model, "as_dict") else dict(config.model)
            ModelConfig.from_hparams({**model, "vocab_size": model.get("vocab_size") or 1})


def _is_user_error(err: BaseException) -> bool:
    """Input the user has to fix (``UserError``: configs, data, checkpoints), a training run that
    diverged (``NonFiniteLossError``), or torch's own message for a checkpoint of another shape
    loaded by a sharding strategy; anything else is a bug and keeps its traceback."""
    if isinstance(err, (UserError, NonFiniteLossError)):
        return True
    return isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in str(err)


def main(args=None) -> int:
    """Run the CLI; return the process exit status (0 ok, 1 non-finite loss, 2 user error: ``run_command``)."""
    return run_command(lambda: fit(args), _is_user_error, lambda err: 1 if isinstance(err, NonFiniteLossError) else 2)


def fit(args) -> int:
    with run_output():
        ModLMCLI(args=args)
    end_process_group()  # after success only: after an error, this rank's collectives may still wait on a peer
    return 0
