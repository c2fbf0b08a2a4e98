"""The decode loop on its own (no HTTP): requests that join a running batch between steps get what
``modlm-generate`` gives each alone, seeded samples are the seed's, a request whose client has gone
frees its row, the waiting line is bounded, and a turn that fails fails its requests, not the loop."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from modlm.cli.generate import GenerateOptions, continuations
from modlm.data.tokenizer import end_of_text_id
from modlm.saved import load_saved
from modlm.serve.engine import Engine, Job, QueueFull, Sampling, Stopped
from modlm.serve.text import TextStream

PROMPTS = ["def f(", "import os\nimport sys\n", "class A:", "    return x", "for i in range(10):\n    ", "x"]


@pytest.fixture(scope="module")
def saved(model_folder):
    return load_saved(str(model_folder))


@pytest.fixture(autouse=True)
def one_thread():
    """The engine's thread computes with one torch thread: with two threads waiting on each other on
    a shared 2-core machine, OpenMP's spinning made these tests 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Collector:
    """A job's ``emit``: its text and how it ended."""

    def __init__(self):
        self.parts, self.reason, self.error = [], None, None
        self.done = threading.Event()

    def __call__(self, update):
        self.parts.append(update.text)
        if update.finish_reason:
            self.reason, self.error = update.finish_reason, update.error
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.parts)


def job(saved, prompt, max_tokens, sampling=None, stops=(), end_id=None) -> tuple[Job, Collector]:
    out = Collector()
    ids = saved.tokenizer.encode(prompt).ids if isinstance(prompt, str) else prompt
    end_id = end_of_text_id(saved.tokenizer) if end_id is None else end_id
    return Job(
        prompt=ids,
        max_tokens=max_tokens,
        sampling=sampling or Sampling(temperature=0),
        stream=TextStream(saved.tokenizer, list(stops)),
        emit=out,
        end_id=end_id,
    ), out


def engine(saved, **settings) -> Engine:
    e = Engine(saved.model, **settings)
    e.start()
    return e


def wait_for(condition, timeout=30.0) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def alone(saved, prompt, **options) -> str:
    return continuations(saved, [prompt], GenerateOptions(**options), stream=False)[0]


def test_requests_joining_a_running_batch_get_what_each_gets_alone(saved):
    """Each request is submitted once the one before it has produced text, so every one joins a
    batch that is decoding; prompts are prefilled 3 tokens per step; one stops at a stop string."""
    lengths = [30, 12, 25, 8, 20, 16]
    stops = {2: ["e"]}
    e = engine(saved, max_batch=4, prefill_chunk=3)
    try:
        outs = []
        for i, (prompt, n) in enumerate(zip(PROMPTS, lengths)):
            j, out = job(saved, prompt, n, stops=stops.get(i, ()))
            e.submit(j)
            outs.append(out)
            while not out.parts and not out.done.is_set():
                time.sleep(0.001)
        assert all(out.done.wait(30) for out in outs)
    finally:
        e.stop()
    want = [
        alone(saved, p, max_new_tokens=n, temperature=0, stop=stops.get(i, []))
        for i, (p, n) in enumerate(zip(PROMPTS, lengths))
    ]
    assert [out.text for out in outs] == want
    assert len(set(want)) == len(want) and all(len(set(w)) > 3 for w in want[:2]), "continuations must vary"
    assert outs[2].reason == "stop" and outs[0].reason == "length"


def test_a_request_ends_at_its_end_of_text_token(saved):
    """The request's end token is here a token greedy decoding gives (the served model never predicts
    its end-of-text token): the request ends there, its text the tokens before it."""
    ids = saved.tokenizer.encode(PROMPTS[0]).ids
    tokens = saved.model.generate(ids, max_new_tokens=12, temperature=0)[len(ids) :].tolist()
    at = next(i for i in range(2, 12) if tokens[i] not in tokens[:i])
    e = engine(saved)
    try:
        j, out = job(saved, PROMPTS[0], 12, end_id=tokens[at])
        e.submit(j)
        assert out.done.wait(30)
    finally:
        e.stop()
    assert out.reason == "stop" and j.completion_tokens == at + 1 and out.text == saved.tokenizer.decode(tokens[:at])


def test_a_seeded_request_draws_what_it_draws_alone(saved):
    sampling = dict(temperature=0.9, top_k=40, top_p=0.95)
    e = engine(saved, max_batch=4)
    try:
        others = [job(saved, p, 40, Sampling(temperature=1.0)) for p in PROMPTS[2:5]]
        for j, _ in others:
            e.submit(j)
        mine, out = job(saved, PROMPTS[0], 24, Sampling(seed=11, **sampling))
        e.submit(mine)
        assert out.done.wait(30) and all(o.done.wait(30) for _, o in others)
    finally:
        e.stop()
    assert out.text == alone(saved, PROMPTS[0], max_new_tokens=24, seed=11, **sampling)
    assert out.text != alone(saved, PROMPTS[0], max_new_tokens=24, seed=12, **sampling)


def test_a_request_is_running_when_its_first_text_comes_and_counted_once(saved):
    """The load a consumer reads at each text it gets: from the first text on it is running, never in
    two places or none (a prompt prefilled whose row is not taken yet), and a one-token request too."""
    e = engine(saved)
    try:
        for max_tokens in (6, 1):
            seen = []
            j, out = job(saved, PROMPTS[0], max_tokens)
            j.emit = lambda update, out=out: (seen.append(e.load()), out(update))
            e.submit(j)
            assert out.done.wait(30) and out.reason == "length"
            assert [(s["running"], s["waiting"]) for s in seen] == [(1, 0)] * len(seen) and seen
            assert wait_for(lambda: e.load()["running"] == 0)
    finally:
        e.stop()


def test_a_cancelled_request_frees_its_row_and_the_line_is_bounded(saved):
    e = engine(saved, max_batch=1, max_queue=1)
    try:
        running, first = job(saved, PROMPTS[0], 8000)
        e.submit(running)
        while not first.parts:
            time.sleep(0.001)
        waiting, second = job(saved, PROMPTS[1], 4)
        e.submit(waiting)
        with pytest.raises(QueueFull):
            e.submit(job(saved, PROMPTS[2], 4)[0])
        assert e.load() == {"running": 1, "waiting": 1, "max_batch": 1, "ended": {}}
        e.cancel(running)
        assert second.done.wait(30) and second.reason == "length"  # the waiting one got the row
        assert wait_for(lambda: e.load()["running"] == 0) and not first.done.is_set()
        assert e.load()["ended"] == {"cancelled": 1, "length": 1}
    finally:
        e.stop()


def test_draining_refuses_new_requests_lets_those_here_finish_then_ends_the_rest(saved):
    e = engine(saved)
    short, short_out = job(saved, PROMPTS[0], 5)
    endless, endless_out = job(saved, PROMPTS[1], 8000)
    e.submit(endless)
    e.submit(short)
    assert wait_for(lambda: e.load()["running"] == 2 or short_out.done.is_set())
    e.drain(0.5)
    with pytest.raises(Stopped):
        e.submit(job(saved, PROMPTS[2], 3)[0])
    assert short_out.done.wait(30) and short_out.reason == "length"
    assert endless_out.done.wait(30) and endless_out.reason == "error" and "stopped" in endless_out.error
    e.thread.join(30)
    assert not e.thread.is_alive()


def test_a_failing_turn_fails_its_requests_and_the_loop_serves_the_next(saved):
    e = engine(saved)
    try:
        broken, out = job(saved, [saved.model.config.vocab_size + 5], 4)  # no such token: the model raises
        e.submit(broken)
        assert out.done.wait(30) and out.reason == "error" and "IndexError" in out.error
        fine, out = job(saved, PROMPTS[0], 4)
        e.submit(fine)
        assert out.done.wait(30) and out.reason == "length" and e.alive
    finally:
        e.stop()
