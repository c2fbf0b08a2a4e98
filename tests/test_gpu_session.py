"""``bench/gpu_session.sh`` on a machine it cannot measure stops before writing anything: one line on
stderr naming what is missing, exit status 2, no ``$OUT`` folder and no temporary folder left."""

import os
import shutil
import subprocess

import pytest
import torch

from tests.helpers import REPO

SCRIPT = REPO / "bench" / "gpu_session.sh"


def session(script, tmp_path, **env):
    out = tmp_path / "out"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = subprocess.run(
        ["bash", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OUT": str(out), "TMPDIR": str(scratch), **env},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert not out.exists() and not list(scratch.glob("modlm_gpu.*"))  # (torch's import makes its own folder there)
    return done.stderr.strip()


@pytest.mark.slow  # the check imports torch, lightning and modlm in a subprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the session would run")
def test_without_a_gpu_the_session_stops_in_one_line(tmp_path):
    line = session(SCRIPT, tmp_path)
    assert line.startswith("gpu_session: no CUDA GPU: torch ")
    assert line.endswith("sees none; this session measures a GPU")


def test_outside_a_checkout_or_with_a_bad_budget_the_session_stops_in_one_line(tmp_path):
    (tmp_path / "bench").mkdir()
    shutil.copy(SCRIPT, tmp_path / "bench")
    assert session(tmp_path / "bench" / "gpu_session.sh", tmp_path).startswith("gpu_session: not a modlm checkout")
    bad = session(SCRIPT, tmp_path / "bench", BUDGET="8min")
    assert bad == "gpu_session: BUDGET must be a number of seconds, not '8min'"
