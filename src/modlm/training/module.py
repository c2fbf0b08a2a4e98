"""The LightningModule: a ``MoDTransformer`` plus its loss, metrics and optimizer.

Model arguments are flat: every ``ModelConfig`` field is an init argument of this module (taken as
``**model_config`` and passed to ``ModelConfig``; jsonargparse follows that call, so LightningCLI
shows them as ``--model.d_model``, ``--model.capacity`` ... with their docstrings). The training
knobs sit next to them (``--model.lr``, ``--model.warmup_steps`` ...). ``save_hyperparameters``
stores all of it as plain values, so ``MoDLightningModule.load_from_checkpoint(path)`` rebuilds the
model with no other input.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from ..analysis.flops import forward_flops, training_flops
from ..analysis.metrics import ran_forward_flops
from ..model.config import ModelConfig, Routing
from ..model.errors import UserError
from ..model.hf_format import ARCHITECTURE_FIELDS
from ..model.routing import RoutedBlock
from ..model.transformer import ModelOutput, MoDTransformer
from ..model.version import VERSION_KEY, check_format, written_by
from ..saved.adapters import LORA_TARGETS, LoraSettings
from . import tags, travel
from .batch import loss_targets, split_batch
from .capacity import CAPACITY_KEY, CapacitySchedule
from .checkpoint import RNG_KEY, check_state_dict_fits, check_tokenizer_fits, restore_rng_states, rng_states
from .optim import WarmupCosine, build_adamw
from .parallel import parallelize, without_graphs
from .pretrained import pretrained_config
from .telemetry import StepReport
from .tuning import tuning_for


class MoDLightningModule(pl.LightningModule):
    def __init__(
        self,
        lr: float = 2e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        lr_decay_steps: Optional[int] = None,
        compile: bool = False,
        compile_mode: Optional[
            Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
        ] = None,
        validate_causal: bool = True,
        init_from: Optional[str] = None,
        tune: Literal["full", "routers", "lora"] = "full",
        lora_rank: int = LoraSettings.rank,
        lora_alpha: float = LoraSettings.alpha,
        lora_dropout: float = LoraSettings.dropout,
        lora_targets: tuple[str, ...] = LORA_TARGETS,
        capacity_start: Optional[float] = None,
        capacity_steps: int = 0,
        capacity_shape: Literal["linear", "cosine"] = "cosine",
        **model_config: Any,
    ):
        """Train a Mixture-of-Depths LM.

        Args:
            lr: Peak AdamW learning rate (reached at the end of warmup).
            weight_decay: AdamW decay of matrices; norm gains and biases never decay.
            betas: AdamW betas.
            eps: AdamW epsilon.
            warmup_steps: Optimizer steps of linear warmup.
            min_lr_ratio: The cosine decay ends at ``lr * min_lr_ratio``.
            lr_decay_steps: Step at which the cosine reaches its floor. Default: the trainer's
                ``max_steps``, i.e. the schedule spans the planned run. A resumed run keeps the plan
                stored in its checkpoint.
            compile: ``torch.compile`` each transformer block (see ``modlm.training.parallel``).
            compile_mode: ``torch.compile``'s mode for the blocks: ``reduce-overhead`` adds CUDA graphs
                (one launch per block: for small, launch-bound models on one GPU; not with FSDP2 or
                gradient accumulation; validation and calibration run eagerly), ``max-autotune``
                tunes kernels too (slow to compile); default: torch's.
            validate_causal: For routed models (routed blocks or experts), also validate with
                causal routing (``val/loss_causal``, ``val/ppl_causal``), as used at inference.
            init_from: Start from a pretrained Llama-family model (``LlamaForCausalLM``,
                ``MistralForCausalLM`` without a sliding window, ``Qwen2ForCausalLM``): a transformers
                folder with safetensors weights, or a Hub id (the local cache first). Its config.json
                decides the architecture (vocabulary, width, depth, heads, key/value heads, MLP width,
                norm epsilon, RoPE, tied embeddings: a --model value of these other than the default
                must agree with it); the routing fields (route_every, route_layers, capacity,
                capacities, capacity_depth, router_weight, ...) and max_seq_len stay this run's, so
                the pretrained model is converted to Mixture-of-Depths (route_every 0: fine-tune it
                dense). Routers start at zero; with router_weight 2sigmoid (configs/convert_*.yaml) the
                model at capacity 1 computes the pretrained function. The fit uses the folder's
                tokenizer unless --data.tokenizer names another. A fit resumed from a checkpoint takes
                its weights from the checkpoint, but reads the folder's config.json again.
            tune: ``full`` trains every weight; ``routers`` trains only the routers and causal
                predictors (everything else frozen: the optimizer, and so every checkpoint's optimizer
                state, holds only those); it needs routed blocks. ``lora`` (with ``init_from``) trains
                peft's LoRA adapters on the attention and MLP projections and the routers and predictors,
                everything else frozen; its checkpoints hold what trains plus the pretrained folder's path
                and fingerprint, and read back merged (``modlm.training.tuning``).
            lora_rank: Rank of each LoRA adapter (``tune lora``).
            lora_alpha: LoRA's scale numerator: an adapter's update is multiplied by ``lora_alpha / lora_rank``.
            lora_dropout: Dropout on an adapter's input while training.
            lora_targets: The ``nn.Linear`` layers that get adapters, by name: ``qkv`` (attention's fused
                query/key/value projection), ``proj`` (its output), ``up``, ``gate``, ``down`` (the MLP's).
            capacity_start: Start every routed block at this capacity and lower it to its own
                (``capacity``, ``capacities``) over ``capacity_steps`` optimizer steps, then keep it
                there (None: no schedule; a model without routed blocks has none, and says so). Must be at
                least every target. Saved in checkpoints: a resumed run continues the plan it started with;
                ``flops/step`` counts each step's k.
            capacity_steps: Optimizer steps the capacity schedule spans.
            capacity_shape: ``linear`` or ``cosine`` (a half cosine: slow at both ends).
            **model_config: The ``ModelConfig`` fields (``vocab_size``, ``d_model``, ``capacity`` ...).
        """
        super().__init__()
        # logger=False: Lightning refuses to log module and datamodule hparams that share a key
        # with different values, and ``vocab_size`` does (the data's requested size vs the
        # tokenizer's actual one, which the model uses). ``setup`` logs ours under ``model/``.
        self.save_hyperparameters(logger=False)
        if init_from:
            self.config, folder = pretrained_config(init_from, model_config)
            # what a checkpoint must say to rebuild this model without the folder (load_saved, eval.py)
            self.hparams.update(self.config.to_dict())
            self.model = MoDTransformer.from_hf(
                folder, **{k: v for k, v in self.config.to_dict().items() if k not in ARCHITECTURE_FIELDS}
            )
            self.config = self.model.config
            self.model.train()
            if self.config.routed_layers and self.config.router_weight != "2sigmoid":
                rank_zero_warn(
                    f"modlm: --model.init_from with router_weight={self.config.router_weight!r}: the converted "
                    "model does not start at the pretrained function (zero routers weigh every routed "
                    "block's update by 0.5 with sigmoid, 0 with raw); router_weight 2sigmoid does"
                )
        else:
            self.config = ModelConfig(**model_config)
            self.model = MoDTransformer(self.config)
        self.tuning = tuning_for(
            tune,
            init_from,
            LoraSettings(lora_rank, lora_alpha, lora_dropout, tuple(lora_targets))
            if tune == "lora"
            else LoraSettings(),
        )
        """What trains, and what checkpoints keep (``modlm.training.tuning``)."""
        self.tuning.apply(self.model)
        self.strict_loading = self.tuning.strict_loading
        self.capacity_schedule: Optional[CapacitySchedule] = None
        """Where the routed blocks' capacities go during training (``capacity_start``); None: fixed."""
        if capacity_start is not None and self.config.recursive:
            raise UserError(
                "--model.capacity_start schedules routed blocks' capacities, and a recursive model has "
                "none: its recursion steps take --model.recursion_capacities"
            )
        if capacity_start is not None and not self.config.routed_layers:  # a preset's schedule on a dense run
            rank_zero_info("modlm: no routed blocks (route_every 0): --model.capacity_start has nothing to schedule")
        elif capacity_start is not None:
            self.capacity_schedule = CapacitySchedule(
                capacity_start, capacity_steps, self.config.layer_capacities, capacity_shape
            )
            self._set_capacities(0)
        # Mean per-token cross-entropy over a validation/test run; torchmetrics syncs across ranks.
        self.val_loss = MeanMetric()
        self.val_loss_causal = MeanMetric()
        self.flops_per_batch: Optional[float] = None
        """FLOPs of the latest batch on this device: what Lightning's ``ThroughputMonitor`` reads
        (the telemetry callbacks read each step's ``StepReport`` instead)."""
        self._configured = False
        self._rng_to_restore: Optional[dict] = None  # generator states of a resumed checkpoint, until its first step

    # --- compile / sharding ---------------------------------------------------------------------
    def configure_model(self) -> None:
        """Compile and shard the model (``modlm.training.parallel.parallelize``). Called by every strategy,
        again for validate/test after fit: idempotent. The model was built in ``__init__`` with its
        own init, so nothing is left on the meta device."""
        if self._configured:
            return
        self._configured = True
        accumulation = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        parallelize(
            self.model,
            self.device_mesh,
            compile=self.hparams.compile,
            mode=self.hparams.compile_mode,
            accumulation=accumulation,
        )

    def without_graphs(self):
        """The context of a pass without backward: no CUDA graphs (``modlm.training.parallel.without_graphs``)."""
        return without_graphs(self.hparams.compile, self.hparams.compile_mode)

    def calibrate(self) -> Optional[list[float]]:
        """Calibrate the routers' causal decisions on the run's validation windows (``travel.calibrate``;
        every save does it first: ``ModLMTrainer.save_checkpoint``), a pass without backward, so without
        CUDA graphs. The thresholds, or None when there is nothing to calibrate."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        with self.without_graphs():
            return travel.calibrate(self.model, datamodule)

    def setup(self, stage: str) -> None:
        for logger in self.loggers:
            logger.log_hyperparams({f"model/{k}": v for k, v in self.hparams.items() if not k.startswith("_")})

    # --- steps -----------------------------------------------------------------------------------
    def forward(
        self, idx: torch.Tensor, routing: Routing = Routing.TOPK, targets: Optional[torch.Tensor] = None
    ) -> ModelOutput:
        return self.model(idx, routing=routing, targets=targets)

    def routed_blocks(self) -> list[RoutedBlock]:
        return self.model.routed_blocks()

    def routed_tokens(self, seq_len: int) -> Optional[list[int]]:
        """``k`` of each routed block now (the capacity schedule's step, or its configured capacity)."""
        return [block.router.topk_tokens(seq_len) for block in self.routed_blocks()] or None

    def _set_capacities(self, step: int) -> None:
        for block, capacity in zip(self.routed_blocks(), self.capacity_schedule(step)):
            block.router.capacity = capacity

    def training_step(self, batch: Any, batch_idx: int) -> dict:
        """The loss to optimise and, for the callbacks, the step's ``StepReport``."""
        idx, targets = split_batch(batch)
        out = self(idx, routing=Routing.TOPK, targets=targets)
        tokens = self.routed_tokens(idx.size(1))
        self.flops_per_batch = training_flops(self.config, idx.size(1), tokens_per_routed_block=tokens) * idx.size(0)
        # train/loss is the language-model cross-entropy alone, comparable with val/loss and with
        # a dense baseline; the optimised objective adds the (already weighted) routing aux loss.
        # Not prog_bar: Lightning turns progress-bar values into numbers after every batch, a host sync
        # each; the progress bar reads train/loss itself when it refreshes (modlm.training.callbacks.progress).
        self.log(tags.TRAIN_LOSS, out.loss, on_step=True)
        self.log(tags.TRAIN_AUX_LOSS, out.aux_loss, on_step=True)
        report = StepReport(mixtures=out.mixtures, flops=self.flops_per_batch, routed_tokens=tokens or [])
        return {"loss": out.loss + out.aux_loss, "report": report}

    def _eval_step(self, batch: Any) -> dict:
        with self.without_graphs():
            return self._evaluate(batch)

    def _evaluate(self, batch: Any) -> dict:
        idx, targets = split_batch(batch)
        out = self(idx, routing=Routing.TOPK, targets=targets)
        counted = loss_targets(targets)  # the loss is the mean over these (a chat batch's assistant tokens)
        self.val_loss.update(out.loss, weight=counted)
        tokens = self.routed_tokens(idx.size(1))
        report = StepReport(
            mixtures=out.mixtures,
            routed_tokens=tokens or [],
            flops=forward_flops(self.config, idx.size(1), tokens_per_routed_block=tokens) * idx.size(0),
        )
        if self.config.routes_tokens and self.hparams.validate_causal:
            causal = self(idx, routing=Routing.CAUSAL, targets=targets)
            self.val_loss_causal.update(causal.loss, weight=counted)
            report.causal_mixtures = causal.mixtures
            # charged at what it computed, not at top-k's cost (validation may read counts on the host)
            report.flops += ran_forward_flops(self.config, idx.size(1), causal.mixtures) * idx.size(0)
        self.flops_per_batch = report.flops
        return {"report": report}

    def _eval_epoch_end(self, prefix: str) -> None:
        if self.val_loss.update_count == 0:
            return
        loss = self.val_loss.compute()
        self.log(tags.eval_loss(prefix), loss, prog_bar=True)
        self.log(tags.eval_ppl(prefix), loss.exp())
        self.val_loss.reset()
        if self.val_loss_causal.update_count > 0:
            loss = self.val_loss_causal.compute()
            self.log(tags.eval_loss(prefix, causal=True), loss)
            self.log(tags.eval_ppl(prefix, causal=True), loss.exp())
            self.val_loss_causal.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> dict:
        return self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Any, batch_idx: int) -> dict:
        return self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # --- optimisation ----------------------------------------------------------------------------
    def planned_steps(self) -> int:
        """Optimizer steps the LR schedule spans: ``lr_decay_steps`` or the trainer's ``max_steps``."""
        if self.hparams.lr_decay_steps is not None:
            return self.hparams.lr_decay_steps
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if max_steps is None or max_steps <= 0:
            raise UserError(
                "the learning-rate schedule spans the planned run: set --trainer.max_steps (or --model.lr_decay_steps)"
            )
        return max_steps

    def configure_optimizers(self):
        h = self.hparams
        optimizer = build_adamw(self.model, h.lr, h.weight_decay, tuple(h.betas), h.eps)
        schedule = WarmupCosine(h.warmup_steps, self.planned_steps(), h.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_train_start(self) -> None:
        # A resumed run follows the schedule its checkpoint planned (LambdaLR restores the
        # WarmupCosine object's fields); say so if this run's max_steps disagrees with that plan.
        for config in self.trainer.lr_scheduler_configs:
            for fn in getattr(config.scheduler, "lr_lambdas", []):
                if (
                    isinstance(fn, WarmupCosine)
                    and self.hparams.lr_decay_steps is None
                    and fn.total_steps != self.trainer.max_steps
                ):
                    rank_zero_warn(
                        f"the LR schedule restored from the checkpoint spans {fn.total_steps} steps but "
                        f"--trainer.max_steps={self.trainer.max_steps}; keeping the checkpoint's schedule "
                        "(set --model.lr_decay_steps to change it)"
                    )

    # --- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Beside Lightning's state: torch's generator states, and what travels with the model (its chat
        template, the run's tokenizer and validation windows: ``modlm.training.travel``). The routers' causal
        decisions are calibrated on those windows first, for these very weights: their thresholds are buffers,
        so the state dict Lightning writes carries them."""
        checkpoint[RNG_KEY] = rng_states()
        checkpoint[VERSION_KEY] = written_by()  # the code that wrote it: its format is checked on every read
        if "state_dict" in checkpoint:  # what trains, and what rebuilds the rest
            checkpoint["state_dict"] = self.tuning.saved_state(checkpoint["state_dict"])
        checkpoint.update(self.tuning.checkpoint_extras())
        if self.model.chat_template is not None:  # the pretrained folder's; chat data's own comes with the data
            checkpoint[travel.CHAT_TEMPLATE_KEY] = self.model.chat_template
        if self.capacity_schedule is not None:
            checkpoint[CAPACITY_KEY] = self.capacity_schedule.state_dict()
        if self._trainer is not None:
            checkpoint.update(travel.record(self.trainer.datamodule))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restored here, not at load time: creating the resumed run's dataloader iterator draws from
        # the generator (its worker seed), a draw the uninterrupted run made before its first step.
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng is not None:
            restore_rng_states(rng)
        if self.capacity_schedule is not None:  # this step's k for every routed block
            self._set_capacities(self.global_step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep torch's generator states for the first step; refuse, in one line, a checkpoint of another
        format (``modlm.model.version``); refuse, with a message naming the tensors, a checkpoint of another
        model shape, and, with a message naming both
        fingerprints, a run whose tokenizer is not the checkpoint's (never a silent switch)."""
        check_format(checkpoint.get(VERSION_KEY), "the checkpoint to resume from")
        self._rng_to_restore = checkpoint.get(RNG_KEY)
        if checkpoint.get(CAPACITY_KEY) is not None:  # the plan the run started with, as the LR schedule's
            self.capacity_schedule = CapacitySchedule.from_state(checkpoint[CAPACITY_KEY])
            self._set_capacities(checkpoint.get("global_step", 0))
        saved = checkpoint.get("state_dict") or {}
        if saved:  # sharded checkpoints are loaded (and checked) by the strategy itself
            check_state_dict_fits(self.tuning.saved_state(self.state_dict()), saved)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        check_tokenizer_fits(checkpoint, datamodule)
