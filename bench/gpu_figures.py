"""The Python half of ``bench/gpu_session.sh``: check the machine, read a training run's figures, and
keep ``figures.json`` (every part's status and figures, with the commit) up to date after each part.

    python bench/gpu_figures.py check MACHINE_JSON       # one line and exit 1 if the GPU or a package is missing
    python bench/gpu_figures.py init FIGURES MACHINE_JSON COMMIT BUDGET_S
    python bench/gpu_figures.py train ROOT LOG OUT_JSON  # a train.py run's logged figures and calibration
    python bench/gpu_figures.py merge FIGURES NAME STATUS SECONDS LIMIT [PART_JSON]

Every subcommand is written to end cleanly: ``check`` prints its one line whatever goes wrong, and
the others leave ``figures.json`` whole (written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

BF16_DENSE_PEAK = (
    # (name fragments, all present in the lower-cased device name), bf16 dense FLOP/s from NVIDIA's datasheets
    (("h200",), 989e12),
    (("h100", "pcie"), 756e12),
    (("h100", "nvl"), 835e12),
    (("h100",), 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (("a100",), 312e12),
    (("l40s",), 362e12),
    (("l4",), 121e12),
)
"""Peaks for ``flops/mfu`` (``--flops.peak_flops``); ``PEAK_FLOPS`` in the environment overrides."""

NEEDED = ("torch", "lightning", "tensorboard", "tokenizers", "modlm")


def fail(message: str) -> None:
    print(f"gpu_session: {message}", file=sys.stderr)
    sys.exit(1)


def check(machine_json: str) -> None:
    """Stop with one line unless torch sees a CUDA GPU and every package the session runs imports;
    write what the machine is, and print the bf16 peak ``flops/mfu`` is taken against (or ``none``)."""
    import importlib

    for name in NEEDED:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any import failure is the one line
            hint = " (run from the repository root, or install it)" if name == "modlm" else ""
            fail(f"{name} cannot be imported: {str(err).splitlines()[0] if str(err) else type(err).__name__}{hint}")
    import lightning
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        fail(
            f"no CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none; this session measures a GPU"
        )
    name = torch.cuda.get_device_name(0)
    peak = os.environ.get("PEAK_FLOPS")
    if peak is None:
        lower = name.lower()
        peak = next((p for parts, p in BF16_DENSE_PEAK if all(part in lower for part in parts)), None)
    props = torch.cuda.get_device_properties(0)
    info = {
        "gpu": name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": lightning.__version__,
        "bf16_peak_flops": None if peak is None else float(peak),
    }
    Path(machine_json).write_text(json.dumps(info, indent=1) + "\n")
    print("none" if peak is None else f"{float(peak):.4g}")


def write(path: Path, data: dict) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)


def init(figures: str, machine_json: str, commit: str, budget_s: str) -> None:
    machine = json.loads(Path(machine_json).read_text())
    write(
        Path(figures),
        {
            "commit": commit,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "budget_s": int(budget_s),
            "machine": machine,
            "parts": {},
        },
    )


def scalars(root: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted(root.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


TRAIN_TAGS = (
    "train/device/items_per_sec",
    "train/device/flops_per_sec",
    "train/device/mfu",
    "flops/mfu",
    "flops/ratio_vs_dense",
    "train/loss",
    "val/loss",
    "val/loss_causal",
)
LOG_MARKS = {
    "cudagraph_skips": "skipping cudagraphs",
    "recompile_limit_hits": "recompile_limit",
    "overwritten_outputs": "has been overwritten",
    "tracebacks": "Traceback (most recent call last)",
}


def train(root: str, log: str, out_json: str) -> None:
    """The figures of one ``train.py fit`` run: each tag's last logged value (and the best throughput),
    what its last checkpoint holds (the step, the calibrated thresholds), and marks counted in its log
    (CUDA-graph skips and their reasons, recompile-limit hits, overwritten CUDA-graph outputs)."""
    import torch

    root_path = Path(root)
    logged = scalars(root_path)
    figures: dict = {}
    for tag in TRAIN_TAGS:
        values = logged.get(tag)
        if values:
            last = max(values)
            figures[tag] = {"last": values[last], "at_step": last, "max": max(values.values())}
    checkpoints = sorted((root_path / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if checkpoints:
        saved = torch.load(checkpoints[-1], weights_only=True, map_location="cpu")
        thresholds = [float(v) for k, v in saved["state_dict"].items() if k.endswith(".decision.threshold")]
        figures["checkpoint"] = {
            "file": checkpoints[-1].name,
            "global_step": saved.get("global_step"),
            "decision_thresholds": thresholds,
        }
    text = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
    figures["log"] = {key: text.count(mark) for key, mark in LOG_MARKS.items()}
    reasons = sorted(
        {
            line.split("skipping cudagraphs", 1)[1].strip()[:160]
            for line in text.splitlines()
            if "skipping cudagraphs" in line
        }
    )
    if reasons:
        figures["log"]["cudagraph_skip_reasons"] = reasons
    Path(out_json).write_text(json.dumps(figures, indent=1) + "\n")


def merge(figures: str, name: str, status: str, seconds: str, limit: str, part_json: str = "") -> None:
    """Record one part: its status, time, limit, and the figures its JSON holds (if it wrote one)."""
    path = Path(figures)
    data = json.loads(path.read_text())
    entry: dict = {"status": status, "seconds": int(seconds), "limit_s": int(limit)}
    if part_json and Path(part_json).is_file():
        try:
            entry["figures"] = json.loads(Path(part_json).read_text())
        except json.JSONDecodeError as err:
            entry["figures_unreadable"] = str(err)
    data["parts"][name] = entry
    write(path, data)


def main(argv: list[str]) -> None:
    commands = {"check": check, "init": init, "train": train, "merge": merge}
    if not argv or argv[0] not in commands:
        fail(f"gpu_figures.py takes one of {', '.join(commands)}")
    commands[argv[0]](*argv[1:])


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 - one line, whatever it is
        fail(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
