"""The tree as ruff sees it (settings in pyproject.toml, the same as .pre-commit-config.yaml's hooks): no lint
error, nothing the formatter would change, no line over 120 characters."""

import subprocess
import sys

from tests.helpers import REPO


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True)


def test_ruff_finds_nothing_to_fix():
    done = ruff("check", "--no-fix", ".")
    assert done.returncode == 0, done.stdout[-3000:]


def test_the_tree_is_formatted():
    done = ruff("format", "--check", ".")
    assert done.returncode == 0, done.stdout[-3000:]
