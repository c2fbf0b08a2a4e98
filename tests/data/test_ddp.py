"""Two real processes (gloo): the checkpointed data state holds every rank's position, and
each rank resumes its own part exactly."""

import itertools
import multiprocessing as mp
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from modlm.data import ModLMDataModule
from tests.data.helpers import copy_stdlib

N, K = 8, 3


def make_dm(tmp: Path) -> ModLMDataModule:
    return ModLMDataModule(
        source=str(tmp / "corpus"),
        seq_len=32,
        batch_size=4,
        vocab_size=300,
        tokenizer_train_chars=20_000,
        val_fraction=0.2,
        num_workers=0,
        cache_dir=str(tmp / "cache"),
    )


def worker(rank: int, port: int, tmp: Path, phase: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dm = make_dm(tmp)
        if phase == "resume":
            dm.load_state_dict(torch.load(tmp / "state.pt"))
            torch.save(list(itertools.islice(dm.train_dataloader(), N - K)), tmp / f"resumed{rank}.pt")
            return
        it = iter(dm.train_dataloader())
        head = list(itertools.islice(it, K))
        state = dm.state_dict()  # collective: every rank calls it, as in Lightning's checkpointing
        if rank == 0:
            torch.save(state, tmp / "state.pt")
        torch.save(head + list(itertools.islice(it, N - K)), tmp / f"straight{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_two(tmp: Path, phase: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=worker, args=(r, port, tmp, phase)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]


@pytest.mark.slow
def test_two_ranks_save_all_positions_and_resume(tmp_path):
    copy_stdlib(tmp_path / "corpus")
    _ = make_dm(tmp_path).tokenizer  # train once, before the processes start
    run_two(tmp_path, "straight")
    state = torch.load(tmp_path / "state.pt")
    ranks = state["train"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["batches"] == K for r in ranks)
    run_two(tmp_path, "resume")
    for rank in range(2):
        straight = torch.load(tmp_path / f"straight{rank}.pt")
        resumed = torch.load(tmp_path / f"resumed{rank}.pt")
        assert all(torch.equal(a, b) for a, b in zip(straight[K:], resumed))
    assert not torch.equal(torch.load(tmp_path / "straight0.pt")[0], torch.load(tmp_path / "straight1.pt")[0])
