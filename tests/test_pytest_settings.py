"""The test run's own settings (``[tool.pytest.ini_options]`` in pyproject.toml) do what they say."""

import os
import shlex
import warnings

import pytest

from tests.helpers import REPO


@pytest.fixture
def warning_filters(request):
    if not request.config.pluginmanager.has_plugin("warnings"):
        pytest.skip("pytest's warnings plugin is off (-p no:warnings): the configured filters do not apply")


def warn_from(module: str, category=DeprecationWarning) -> None:
    """A warning whose origin is ``module``, as ``warnings.warn`` attributes one to its caller."""
    warnings.warn_explicit("an old API", category, f"{module.replace('.', '/')}.py", 1, module=module)


@pytest.mark.parametrize("module", ["modlm", "modlm.model.routing", "modlm.training.callbacks.nonfinite"])
def test_a_deprecation_warning_from_modlm_is_an_error(warning_filters, module):
    with pytest.raises(DeprecationWarning, match="an old API"):
        warn_from(module)


@pytest.mark.parametrize("module", ["modlmx", "torch.nn.modules.module", "tests.model.test_model"])
def test_other_modules_deprecation_warnings_are_reported_not_raised(warning_filters, module):
    with warnings.catch_warnings(record=True) as seen:
        warn_from(module)
    assert [str(w.message) for w in seen] == ["an old API"]


def test_every_test_has_a_time_limit(request):
    assert float(request.config.getini("timeout")) == 300


def test_the_default_run_leaves_out_the_slow_tests(request):
    """``python -m pytest`` selects ``not slow`` (the configured ``-m``); a ``-m`` on the command line
    comes later and replaces it, so ``python -m pytest -m slow`` selects the slow ones."""
    assert request.config.getini("addopts") == ["-m", "not slow"]
    assert any(line.startswith("slow: left out of the default run") for line in request.config.getini("markers"))


def test_ci_runs_the_default_and_the_slow_tests():
    """CI runs both test commands in one ``&&`` chain, its last line (under ``set -e`` a chain that fails
    before its last command does not stop the script, so nothing may follow it): the script fails when
    either run fails, and together they run every test."""
    lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert "set -euo pipefail" in lines
    runs = [shlex.split(command) for command in lines[-1].split("&&") if "pytest" in command]
    assert len(runs) == 2
    default, slow = runs
    assert default[:3] == slow[:3] == ["python", "-m", "pytest"]
    assert "-m" not in default[3:]  # the configured selection
    assert slow[3:5] == ["-m", "slow"]


def test_torch_runs_one_thread_here_and_in_the_processes_tests_start():
    import torch

    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
