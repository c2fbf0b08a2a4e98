"""Step time of the default training run with and without the routing/FLOPs telemetry callbacks.

    python bench/telemetry_overhead.py                 # default config, 3 interleaved A/B pairs
    python bench/telemetry_overhead.py --steps 40 --pairs 5

Each run is a real ``Trainer.fit`` of the default model and data (the code's defaults, with
configs/default.yaml's trainer settings)
for ``--steps`` optimizer steps, with the default telemetry intervals (``RoutingStats``,
``FlopsMeter``, ``RoutingHeatmap``; validation off so only per-step costs count). The time of every
step after the warm-up is recorded by a small timing callback; the figure is the ratio of median
step times, with and without telemetry, over interleaved pairs of runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from modlm.data import ModLMDataModule
from modlm.training.callbacks.flops_meter import FlopsMeter
from modlm.training.callbacks.routing_heatmap import RoutingHeatmap
from modlm.training.callbacks.routing_stats import RoutingStats
from modlm.training.module import MoDLightningModule

DEFAULT_CONFIG = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "default.yaml").read_text())


class StepTimer(pl.Callback):
    def __init__(self, skip: int):
        self.skip, self.times, self._t = skip, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self._t)


def run(telemetry: bool, steps: int, skip: int) -> list[float]:
    cfg = DEFAULT_CONFIG  # the default run's trainer settings; its model and data are the code's defaults
    pl.seed_everything(cfg["seed_everything"], verbose=False)
    data = ModLMDataModule()
    model = MoDLightningModule(vocab_size=data.tokenizer_vocab_size, max_seq_len=data.seq_len)
    timer = StepTimer(skip)
    callbacks = [timer] + ([RoutingStats(), FlopsMeter(), RoutingHeatmap()] if telemetry else [])
    trainer_cfg = {k: cfg["trainer"][k] for k in ("precision", "log_every_n_steps", "gradient_clip_val")}
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            default_root_dir=root,
            max_steps=steps,
            callbacks=callbacks,
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **trainer_cfg,
        )
        trainer.fit(model, data)
    return timer.times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps not timed")
    p.add_argument("--pairs", type=int, default=3)
    args = p.parse_args()
    times = {True: [], False: []}
    for pair in range(args.pairs):
        for telemetry in (False, True):  # interleaved, so both see the same machine noise
            times[telemetry] += run(telemetry, args.steps, args.skip)
        with_, without = statistics.median(times[True]), statistics.median(times[False])
        print(
            f"after pair {pair + 1}: median step {without:.3f} s without, {with_:.3f} s with telemetry "
            f"-> overhead {with_ / without - 1:+.1%}",
            flush=True,
        )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.pairs} pairs x "
        f"{args.steps - args.skip} timed steps"
    )


if __name__ == "__main__":
    main()
