"""Several nodes, on this machine: two torchrun "nodes" of two processes each (gloo), and a run on
prepared shards resumed on another number of processes.

Each 2 x 2 test trains N steps uninterrupted, then trains again and has every process SIGKILL
itself after step K (a node lost, no cleanup), then resumes with ``--ckpt_path last`` on the same
layout: the resumed steps must log exactly the uninterrupted run's losses. FSDP2 runs on
``ModelParallelStrategy``'s default mesh, (nodes x processes per node) = 2 x 2: shards within a
node, replicas across nodes (HSDP).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modlm.data.prepare import PrepareSettings, prepare_corpus
from tests.helpers import (
    REPO,
    TINY_DATA,
    VAL_FRACTION,
    assert_same_losses_after_resume,
    free_port,
    run_train,
    scalars,
    tiny_args,
)

N, K = 6, 4
LAUNCH_TIMEOUT = 200  # seconds; a launch takes ~30 s on 2 cores
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * LAUNCH_TIMEOUT + 60)]  # three launches a test
COMMON = (
    "--trainer.accelerator",
    "cpu",
    "--model.lr_decay_steps",
    str(N),
    "--trainer.max_steps",
    str(N),
    "--checkpoint.every_n_train_steps",
    "2",
    "--trainer.val_check_interval",
    str(N),
)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants now (torchrun starts each worker in a session of its own, out of
    reach of a signal to the agent's process group)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(parents.get(tree[-1], []))
    return tree


def torchrun_two_nodes(*args: str, timeout: float = LAUNCH_TIMEOUT) -> list[subprocess.CompletedProcess]:
    """``train.py fit ARGS`` under two torchrun agents (node ranks 0 and 1, 2 processes each).

    A launch that outlives ``timeout`` has both agents and their workers killed, and fails with what
    each node printed, rather than leaving them running.
    """
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "2",
                "--node-rank",
                str(node),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                str(REPO / "train.py"),
                "fit",
                "--trainer.num_nodes",
                "2",
                "--trainer.devices",
                "2",
                *args,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    deadline = time.monotonic() + timeout
    done = []
    try:
        for proc in nodes:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        for pid in [p for proc in nodes for p in process_tree(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        printed = [run.stdout + run.stderr for run in done] + [
            "".join(proc.communicate()) for proc in nodes[len(done) :]
        ]
        pytest.fail(
            f"the two-node launch ran over {timeout:.0f} s\n"
            + "".join(f"--- node {n} printed (end) ---\n{text[-3000:]}\n" for n, text in enumerate(printed))
        )
    return done


def kill_and_resume(tmp_path, data, *strategy: str) -> tuple[dict, dict]:
    full = torchrun_two_nodes(*tiny_args(tmp_path / "full", data, *COMMON, *strategy))
    assert all(n.returncode == 0 for n in full), full[0].stderr[-4000:] + full[1].stderr[-2000:]
    killed = torchrun_two_nodes(
        *tiny_args(
            tmp_path / "cut",
            data,
            *COMMON,
            *strategy,
            "--trainer.callbacks+=tests.helpers.callbacks.KillAtStep",
            "--trainer.callbacks.step",
            str(K),
        )
    )
    assert all(n.returncode != 0 for n in killed)  # every worker died by SIGKILL, so both agents fail
    assert "Signal 9" in killed[0].stderr + killed[1].stderr or "SIGKILL" in killed[0].stderr + killed[1].stderr
    resumed = torchrun_two_nodes(*tiny_args(tmp_path / "cut", data, *COMMON, *strategy, "--ckpt_path", "last"))
    assert all(n.returncode == 0 for n in resumed), resumed[0].stderr[-4000:]
    return (
        scalars(tmp_path / "full" / "lightning_logs" / "version_0"),
        scalars(tmp_path / "cut" / "lightning_logs" / "version_0"),
    )  # the resumed run goes on in it


def test_two_nodes_ddp_killed_and_resumed(tmp_path, tiny_tokenizer):
    want, got = kill_and_resume(tmp_path, tiny_tokenizer, "--trainer.strategy", "ddp")
    assert_same_losses_after_resume(want, got, K, N)


def test_two_nodes_fsdp2_hsdp_mesh_killed_and_resumed(tmp_path, tiny_tokenizer):
    strategy = ("--trainer.strategy", '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}')
    want, got = kill_and_resume(tmp_path, tiny_tokenizer, *strategy)
    assert_same_losses_after_resume(want, got, K, N)
    assert (tmp_path / "cut" / "checkpoints" / "last.ckpt" / ".metadata").is_file()  # sharded, complete


def test_prepared_shards_resume_on_another_number_of_processes(tmp_path, tiny_tokenizer):
    corpus, tokenizer = tiny_tokenizer
    shards = tmp_path / "tokens"
    prepare_corpus(
        corpus,
        shards,
        PrepareSettings(
            vocab_size=TINY_DATA["vocab_size"],
            tokenizer=tokenizer,
            text_field="text",
            val_fraction=float(VAL_FRACTION),
            seed=1234,
            tokenizer_train_chars=TINY_DATA["tokenizer_train_chars"],
            cache_dir=None,
            num_proc=2,
            shard_tokens=10_000,
            progress=False,
        ),
    )
    args = tiny_args(
        tmp_path / "run",
        (str(shards), tokenizer),
        "--trainer.accelerator",
        "cpu",
        "--model.lr_decay_steps",
        str(N),
        "--checkpoint.every_n_train_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
    )
    two = run_train("fit", *args, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", str(K))
    assert two.returncode == 0, two.stderr[-4000:]
    one = run_train(
        "fit",
        *args,
        "--trainer.devices",
        "1",
        "--data.num_workers",
        "2",
        "--trainer.max_steps",
        str(N),
        "--ckpt_path",
        "last",
    )
    assert one.returncode == 0, one.stderr[-4000:]
    assert "restarting the data stream" not in one.stderr
    batch = TINY_DATA["batch_size"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == N
    # 4 steps x 2 ranks, then 2 steps x 1 rank: every window consumed exactly once so far
    assert ckpt["datamodule_hyper_parameters"]["source"] == str(shards)
    state = ckpt["ModLMDataModule"]  # the data module's state, saved under its class name
    assert state["train"]["consumed"] == (K * 2 + (N - K)) * batch
    logged = scalars(tmp_path / "run" / "lightning_logs" / "version_0")  # both runs, one curve
    assert set(logged["train/loss"]) == set(range(N))
