"""lm-evaluation-harness scores while training: every ``every_n_steps`` optimizer steps, a few tasks
scored on the model as it is (``modlm.analysis.harness``), logged as ``harness/<task>/<metric>`` (and
``harness/<task>/capacity_used`` for a routed model). Off unless ``--harness.tasks`` names tasks.

The tasks are found and their data loaded when the fit starts, so a wrong name or unreachable data
stops the run before its first step rather than at the first scoring. Scoring runs on global rank 0
alone, with the training precision's autocast, in eval mode, and hands the model back in train mode;
the other ranks wait for it at their next collective. A sharded model (FSDP) cannot run a forward on
one rank: score its checkpoints with ``modlm-eval CKPT --tasks ...`` instead.
"""

from __future__ import annotations

from typing import Literal, Optional

from lightning.pytorch.callbacks import Callback

from ...model.errors import UserError
from .. import tags


class HarnessScores(Callback):
    def __init__(
        self,
        tasks: Optional[list[str]] = None,
        every_n_steps: int = 500,
        include_path: Optional[str] = None,
        limit: Optional[int] = 100,
        num_fewshot: Optional[int] = None,
        batch_size: int = 8,
        routing: Literal["causal", "topk"] = "causal",
    ):
        """lm-evaluation-harness scores of a few tasks every N steps (off unless tasks are named).

        Args:
            tasks: lm-eval task names (or YAML files) to score; none: no scoring
            every_n_steps: score at every this many optimizer steps
            include_path: a folder of lm-eval task YAML files (local tasks)
            limit: score at most this many documents per task (none: all)
            num_fewshot: few-shot examples per prompt (none: each task's own)
            batch_size: rows per forward pass
            routing: causal (as at inference) or topk (the training computation; its scores leak)
        """
        self.tasks = list(tasks or [])
        self.every_n_steps = every_n_steps
        self.include_path = include_path
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.routing = routing
        self._loaded: Optional[list] = None
        self._manager = None
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.tasks or stage != "fit":
            return
        if self.every_n_steps < 1:
            raise UserError(f"--harness.every_n_steps={self.every_n_steps} is invalid: must be at least 1")
        if any(kind in type(trainer.strategy).__name__ for kind in ("FSDP", "ModelParallel")):
            raise UserError(
                "--harness.tasks scores on one rank, which a sharded model cannot do: score its "
                "checkpoints with modlm-eval CKPT --tasks instead"
            )
        if trainer.global_rank == 0:
            from ...analysis.harness.tasks import load_tasks, quiet_lm_eval, task_manager

            quiet_lm_eval()
            self._manager = task_manager(self.tasks, self.include_path)
            self._loaded = load_tasks(self.tasks, self._manager)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._loaded is None or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step  # once per optimizer step, however many batches it accumulates
        scores = self.score(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(scores, step=step)

    def score(self, trainer, pl_module) -> dict[str, float]:
        """The tasks' figures on the model now, by TensorBoard tag (no standard errors: no bootstrap)."""
        from ...analysis.harness.lm import ModLMHarness
        from ...analysis.harness.tasks import metric_key, run_tasks

        model = pl_module.model
        lm = ModLMHarness(model, trainer.datamodule.tokenizer, routing=self.routing, batch_size=self.batch_size)
        try:
            with trainer.precision_plugin.forward_context():
                results = run_tasks(lm, self._loaded, self._manager, self.num_fewshot, self.limit, bootstrap_iters=0)
        finally:
            model.train()
        scores = {}
        for task, metrics in results["results"].items():
            for name, value in metrics.items():
                key = metric_key(name)
                if key is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                    scores[tags.harness(task, key)] = float(value)
        for task, usage in lm.usage.tasks.items():
            figures = lm.usage.figures(usage)
            if "capacity_used" in figures:
                scores[tags.harness(task, "capacity_used")] = figures["capacity_used"]
        return scores
