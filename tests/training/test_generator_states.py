"""The generator states a checkpoint carries: after a resume, every rank of a multi-GPU run draws on
its own device what the uninterrupted run would have drawn next (random routing depends on it).

No GPU here: ``torch.cuda`` is given two devices with a CPU generator each, as one process of a
2-GPU run sees them (every device's generator seeded alike, only the rank's own device drawn from).
The CPU generator is the real one."""

import pytest
import torch

from modlm.training.checkpoint import restore_rng_states, rng_states

SEED, DEVICES = 1234, 2


class Process:
    """One rank's process as ``torch.cuda`` reports it: ``DEVICES`` device generators, seeded alike
    (as seed_everything seeds them), the rank's device the current one."""

    def __init__(self, monkeypatch, rank: int):
        torch.manual_seed(SEED)
        self.rank = rank
        self.generators = [torch.Generator().manual_seed(SEED) for _ in range(DEVICES)]
        cuda = {
            "is_available": lambda: True,
            "device_count": lambda: DEVICES,
            "current_device": lambda: self.rank,
            "get_rng_state": lambda device="cuda": self.generators[self.index(device)].get_state(),
            "set_rng_state": lambda state, device="cuda": self.generators[self.index(device)].set_state(state),
            "get_rng_state_all": lambda: [g.get_state() for g in self.generators],
            "set_rng_state_all": lambda states: [g.set_state(s) for g, s in zip(self.generators, states)],
        }
        for name, fn in cuda.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def index(self, device) -> int:
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        return self.rank if device.index is None else device.index

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What a random-routing step draws: on this rank's device, and on the CPU."""
        return torch.rand(4, generator=self.generators[self.rank]), torch.rand(4)


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_resumes_its_own_device_generator(monkeypatch, rank):
    steps = 3
    writer = Process(monkeypatch, 0)  # rank 0 writes the checkpoint after `steps` steps
    for _ in range(steps):
        writer.draw()
    saved = rng_states()

    uninterrupted = Process(monkeypatch, rank)
    for _ in range(steps):
        uninterrupted.draw()
    want = uninterrupted.draw()

    resumed = Process(monkeypatch, rank)  # a new process of the resumed run
    restore_rng_states(saved)
    got = resumed.draw()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(got[0], Process(monkeypatch, rank).draw()[0])  # not the seed's first draw


def test_a_checkpoint_without_a_device_state_restores_the_cpu_generator_only(monkeypatch):
    torch.manual_seed(0)
    saved = {"cpu": torch.get_rng_state(), "device": None}  # written on a machine without CUDA
    want = torch.rand(4)
    process = Process(monkeypatch, 1)
    before = process.generators[1].get_state()
    restore_rng_states(saved)
    assert torch.equal(torch.rand(4), want)
    assert torch.equal(process.generators[1].get_state(), before)
