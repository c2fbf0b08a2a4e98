"""The test run's own settings (``[tool.pytest.ini_options]`` in pyproject.toml) do what they say."""
import warnings

import pytest


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
