"""The default run's precision follows the hardware: bf16-mixed where bf16 is native, else fp32;
a precision named on the command line or in a config always wins."""

import pytest
import torch

from modlm.cli.train import ModLMCLI
from modlm.training import precision
from tests.helpers import VAL_FRACTION

BF16_CPU = {"avx512_bf16"}  # e.g. Intel Sapphire Rapids / AMD Zen 4
AVX2_CPU: set = set()  # e.g. AMD EPYC Zen 2/3: bf16 only emulated


@pytest.fixture
def cpu_kind(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def use(features):
        monkeypatch.setattr(precision, "cpu_bf16_features", lambda: set(features))

    return use


@pytest.mark.parametrize(
    "features, want",
    [(BF16_CPU, "bf16-mixed"), ({"amx_bf16"}, "bf16-mixed"), ({"bf16"}, "bf16-mixed"), (AVX2_CPU, "32-true")],
)
def test_choice_on_each_kind_of_cpu(cpu_kind, features, want):
    cpu_kind(features)
    chosen, why = precision.choose_precision("auto")
    assert chosen == want
    assert ("natively" in why) == (want == "bf16-mixed")


@pytest.mark.parametrize(
    "gpu, major, want",
    [
        ("Tesla V100", 7, "32-true"),
        ("Tesla T4", 7, "32-true"),
        ("NVIDIA A100", 8, "bf16-mixed"),
        ("NVIDIA H100", 9, "bf16-mixed"),
    ],
)
def test_choice_on_each_kind_of_gpu(monkeypatch, gpu, major, want):
    """A GPU before compute capability 8 runs bf16 tensors emulated (torch's own check, which would
    say yes, is what ``torch.cuda.is_bf16_supported`` asks by default): fp32 there. No GPU here, so
    what CUDA reports is patched and torch's own ``is_bf16_supported`` decides from it."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major, minor=0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    chosen, why = precision.choose_precision("auto")
    assert chosen == want
    assert gpu in why and ("natively" in why) == (want == "bf16-mixed")


def test_cpuinfo_flags_are_read(monkeypatch, tmp_path):
    real_read = precision.Path.read_text
    fake = {"/proc/cpuinfo": "processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"}
    monkeypatch.setattr(
        precision.Path, "read_text", lambda self, *a, **k: fake.get(str(self)) or real_read(self, *a, **k)
    )
    assert precision.cpu_bf16_features() == {"avx512_bf16"}
    fake["/proc/cpuinfo"] = "processor : 0\nflags : fpu sse avx2 avx512f avx512bw\n"  # AVX512 without BF16
    assert precision.cpu_bf16_features() == set()


def _cli(tmp_path, data, *extra):
    corpus, tokenizer = data
    return ModLMCLI(
        args=[
            "--trainer.default_root_dir",
            str(tmp_path),
            "--data.source",
            corpus,
            "--data.tokenizer",
            tokenizer,
            "--data.val_fraction",
            VAL_FRACTION,
            "--data.num_workers",
            "0",
            *extra,
        ],
        run=False,
    )


@pytest.mark.parametrize("features, want", [(BF16_CPU, "bf16-mixed"), (AVX2_CPU, "32-true")])
def test_default_run_gets_the_fast_precision(cpu_kind, tmp_path, tiny_tokenizer, features, want):
    cpu_kind(features)
    assert _cli(tmp_path, tiny_tokenizer).trainer.precision == want


@pytest.mark.parametrize("features, asked", [(BF16_CPU, "32-true"), (AVX2_CPU, "bf16-mixed")])
def test_an_explicit_precision_wins(cpu_kind, tmp_path, tiny_tokenizer, features, asked):
    cpu_kind(features)
    assert _cli(tmp_path, tiny_tokenizer, "--trainer.precision", asked).trainer.precision == asked
