"""modlm as an installable package: declared dependencies, console scripts, presets as package data.

The slow test installs the package into a fresh virtual environment outside the checkout and runs
the console scripts from an unrelated directory, as someone who ran ``pip install .`` would.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

from modlm.training.export import ENTRY_FILES
from tests.helpers import REPO

tomllib = pytest.importorskip("tomllib")

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_name(spec: str) -> str:
    """``"jsonargparse[signatures]>=4.32"`` -> ``"jsonargparse"`` (lower case, ``-`` for ``_``)."""
    for stop in "[<>=!~; ":
        spec = spec.split(stop)[0]
    return spec.strip().lower().replace("_", "-")


def third_party_imports(root: Path, keep=lambda path: True) -> set[str]:
    """Top-level modules imported anywhere under ``root`` (in the files ``keep`` accepts) that are
    neither stdlib nor modlm."""
    found = set()
    for path in filter(keep, root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name not in ("modlm", "__future__")}


def test_every_imported_package_is_a_declared_dependency():
    declared = {requirement_name(spec) for spec in PYPROJECT["project"]["dependencies"]}
    distributions = packages_distributions()
    # The export's remote code (run by transformers, not by modlm) is checked on its own below.
    modules = third_party_imports(REPO / "src" / "modlm", keep=lambda path: path.name not in ENTRY_FILES)
    assert {"torch", "lightning", "tqdm", "pyarrow", "numpy"} <= modules  # the scan sees lazy imports too
    missing = {}
    for module in modules:
        names = {requirement_name(d) for d in distributions.get(module, [module])}
        if not names & declared:
            missing[module] = sorted(names)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_remote_code_needs_only_declared_dependencies():
    """The files transformers runs from an export folder import transformers, a dependency of modlm itself
    (it renders chat templates with it), and nothing undeclared; the ``hf`` extra still names it."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    declared = {requirement_name(spec) for spec in PYPROJECT["project"]["dependencies"]}
    remote = third_party_imports(REPO / "src" / "modlm", keep=lambda path: path.name in ENTRY_FILES)
    assert "transformers" in remote and remote <= declared, remote - declared
    for extra in ("hf", "test"):
        assert "transformers" in {requirement_name(s) for s in extras[extra]}, extra


def test_console_scripts_and_presets_are_declared():
    assert PYPROJECT["project"]["scripts"] == {
        "modlm-train": "modlm.cli.train:main",
        "modlm-eval": "modlm.cli.eval:main",
        "modlm-prepare": "modlm.cli.prepare:main",
        "modlm-generate": "modlm.cli.generate:main",
        "modlm-serve": "modlm.serve.command:main",
    }
    assert "pytest" in {requirement_name(s) for s in PYPROJECT["project"]["optional-dependencies"]["test"]}
    assert (REPO / "configs").resolve() == (REPO / "src" / "modlm" / "configs").resolve()
    presets = {p.name for p in (REPO / "src" / "modlm" / "configs").glob("*.yaml")}
    assert "default.yaml" in presets and "tiny.yaml" in presets
    assert "configs/*.yaml" in PYPROJECT["tool"]["setuptools"]["package-data"]["modlm"]


def test_the_license_is_declared_and_ships_with_the_package():
    from importlib.metadata import metadata

    assert PYPROJECT["project"]["license"] == "MIT" and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert metadata("modlm")["License-Expression"] == "MIT"  # what pip show and PyPI read


@pytest.mark.slow
def test_pip_install_outside_the_checkout_gives_working_commands(tmp_path):
    """``pip install .`` of a copy of the package into a fresh venv; commands run from elsewhere.

    The venv reaches the already installed dependencies through a ``.pth`` file naming this
    interpreter's site-packages (nothing is downloaded, and no other torch can be pulled in); the
    modlm it runs is the one just installed (checked), not the checkout's.
    """
    source = tmp_path / "source"  # a copy: pip builds in the source tree, which must stay clean
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "outer_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*cmd, timeout=300):
        done = subprocess.run([str(c) for c in cmd], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-2000:])
        return done.stdout

    # --no-index: every declared dependency must already be satisfied, or this fails.
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index", "--no-build-isolation", source)
    where = run(
        python, "-c", "import modlm, modlm.cli.train; print(modlm.__file__); print(modlm.cli.train.DEFAULT_CONFIG)"
    ).split()
    assert where[0].startswith(site) and where[1].startswith(site)
    assert Path(where[1]).is_file()
    assert (
        run(
            python, "-c", "from importlib.metadata import metadata as m; print(m('modlm')['License-Expression'])"
        ).strip()
        == "MIT"
    )

    bin_dir = venv / "bin"
    assert "--trainer.max_steps" in run(bin_dir / "modlm-train", "fit", "--help")
    printed = yaml.safe_load(run(bin_dir / "modlm-train", "fit", "--print_config"))
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert printed["trainer"]["max_steps"] == default["trainer"]["max_steps"]
    assert printed["trainer"]["default_root_dir"] == default["trainer"]["default_root_dir"]
    assert "--data.source" in run(bin_dir / "modlm-eval", "--help")
    assert "--num_proc" in run(bin_dir / "modlm-prepare", "--help")
    assert "--max_new_tokens" in run(bin_dir / "modlm-generate", "--help")
    assert "--api_key" in run(bin_dir / "modlm-serve", "--help")
    assert not list(work.iterdir())  # --help and --print_config write nothing
