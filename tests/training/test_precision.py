"""The default run's precision follows the hardware: bf16-mixed where bf16 is native, else fp32;
a precision named on the command line or in a config always wins."""
import pytest
import torch

from modlm.training import precision
from modlm.cli.train import ModLMCLI
from tests.helpers import VAL_FRACTION

BF16_CPU = {"avx512_bf16"}  # e.g. Intel Sapphire Rapids / AMD Zen 4
AVX2_CPU: set = set()       # e.g. AMD EPYC Zen 2/3: bf16 only emulated


@pytest.fixture
def cpu_kind(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def use(features):
        monkeypatch.setattr(precision, "cpu_bf16_features", lambda: set(features))
    return use


@pytest.mark.parametrize("features, want", [(BF16_CPU, "bf16-mixed"), ({"amx_bf16"}, "bf16-mixed"),
                                            ({"bf16"}, "bf16-mixed"), (AVX2_CPU, "32-true")])
def test_choice_on_each_kind_of_cpu(cpu_kind, features, want):
    cpu_kind(features)
    chosen, why = precision.choose_precision("auto")
    assert chosen == want
    assert ("natively" in why) == (want == "bf16-mixed")


def test_cpuinfo_flags_are_read(monkeypatch, tmp_path):
    real_read = precision.Path.read_text
    fake = {"/proc/cpuinfo": "processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"}
    monkeypatch.setattr(precision.Path, "read_text", lambda self, *a, **k: fake.get(str(self)) or real_read(self, *a, **k))
    assert precision.cpu_bf16_features() == {"avx512_bf16"}
    fake["/proc/cpuinfo"] = "processor : 0\nflags : fpu sse avx2 avx512f avx512bw\n"  # AVX512 without BF16
    assert precision.cpu_bf16_features() == set()


def _cli(tmp_path, data, *extra):
    corpus, tokenizer = data
    return ModLMCLI(args=["--trainer.default_root_dir", str(tmp_path), "--data.source", corpus,
                          "--data.tokenizer", tokenizer, "--data.val_fraction", VAL_FRACTION,
                          "--data.num_workers", "0", *extra], run=False)


@pytest.mark.parametrize("features, want", [(BF16_CPU, "bf16-mixed"), (AVX2_CPU, "32-true")])
def test_default_run_gets_the_fast_precision(cpu_kind, tmp_path, tiny_tokenizer, features, want):
    cpu_kind(features)
    assert _cli(tmp_path, tiny_tokenizer).trainer.precision == want


@pytest.mark.parametrize("features, asked", [(BF16_CPU, "32-true"), (AVX2_CPU, "bf16-mixed")])
def test_an_explicit_precision_wins(cpu_kind, tmp_path, tiny_tokenizer, features, asked):
    cpu_kind(features)
    assert _cli(tmp_path, tiny_tokenizer, "--trainer.precision", asked).trainer.precision == asked
