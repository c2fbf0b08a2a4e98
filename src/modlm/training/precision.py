"""The training precision a machine runs fast, chosen when the user does not name one.

bf16 autocast pays off only where the hardware multiplies bf16 natively: CUDA GPUs of compute
capability 8.0 (Ampere) and later, and CPUs with AVX512-BF16 or AMX (x86) or the BF16 extension
(Arm). Elsewhere torch emulates bf16 matrix products, which measured ~0.9 GFLOP/s against ~138
GFLOP/s in fp32 on a 2-core AVX2-only AMD EPYC: the default run went from minutes to hours. Older
GPUs (V100, T4) emulate bf16 too, and ``torch.cuda.is_bf16_supported()`` counts emulation unless
asked ``including_emulation=False``, as here. So the rule is: bf16-mixed where native, otherwise
fp32. An explicit ``--trainer.precision`` is never second-guessed.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""``/proc/cpuinfo`` flags (x86) / features (Arm) that mean native bf16 matrix arithmetic."""


def cpu_bf16_features() -> set[str]:
    """The native-bf16 CPU features this machine reports (empty where it has none or cannot tell)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    found = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found |= set(value.split()) & set(CPU_BF16_FLAGS)
    if not text and platform.system() == "Darwin":  # Apple silicon: M2 and later have FEAT_BF16
        probe = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        if probe.stdout.strip() == "1":
            found.add("bf16")
    return found


def choose_precision(accelerator: str = "auto") -> tuple[str, str]:
    """``(precision, why)`` for a run on ``accelerator`` (the Trainer's argument) whose config names none."""
    use_cuda = str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if use_cuda:
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16-mixed", f"{torch.cuda.get_device_name()} multiplies bf16 natively"
        return "32-true", f"{torch.cuda.get_device_name()} has no native bf16 (it would be emulated)"
    if str(accelerator) == "mps":
        return "32-true", "bf16 autocast on Apple's MPS backend is not reliably faster"
    features = cpu_bf16_features()
    if features:
        return "bf16-mixed", f"the CPU multiplies bf16 natively ({', '.join(sorted(features))})"
    return "32-true", "the CPU has no native bf16 (no AVX512-BF16/AMX/BF16): emulated bf16 runs ~30x slower than fp32"
