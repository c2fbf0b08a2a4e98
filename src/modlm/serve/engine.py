"""The decode loop: one thread owns the model and serves every request through one running batch.

Each turn of the loop prefills one chunk of the prompt of the request next in line (in a state of
its own), then runs one decoding step of every running row. A request whose prompt is in joins the
running rows (``modlm.model.rows.RowPool``) between two steps with its first token already sampled,
and leaves when it ends (its end token, a stop string, ``max_tokens``) or when its client
has gone. A prompt's prefill so delays the running rows by one chunk per step, never by a whole long
prompt. Each row samples with its own settings and its own generator, so a request with a seed
draws what it would draw alone; a greedy row decodes what ``modlm-generate`` decodes alone.

Written by hand, not taken from a serving library: the rows carry MoD's routed caches and
per-row decision state, which only the model's own ``DecodeState`` knows how to hold.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..model.generate import sample_next
from ..model.rows import RowPool
from .text import TextStream


class QueueFull(Exception):
    """Every row is running and the waiting line is at its bound: the server answers 503."""


class Stopped(Exception):
    """The engine is shutting down and takes no new request."""


@dataclass
class Sampling:
    """One request's sampling settings (checked by the API: ``temperature`` 0 is greedy)."""

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None


@dataclass
class Update:
    """What the engine tells a request's consumer: new text, and at the end why it ended
    (``"stop"``, ``"length"``; ``"error"`` with ``error`` set)."""

    text: str = ""
    finish_reason: Optional[str] = None
    error: Optional[str] = None


@dataclass
class Job:
    """One request in the engine: its prompt's token ids, how long and how to sample, and where its
    updates go (``emit``, called on the engine's thread)."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stream: TextStream
    emit: Callable[[Update], None]
    end_id: Optional[int] = None
    """The token that ends it (counted, not shown): the end-of-text token, or a chat's end of turn."""
    completion_tokens: int = 0
    """Tokens sampled so far (an end-of-text token counted)."""
    finish_reason: Optional[str] = None
    cancelled: bool = False
    """Set by the consumer when its client has gone: the engine drops the job at its next turn."""
    fed: int = 0
    """Prompt tokens prefilled so far."""
    state: object = None
    """Its own one-row decoding state while its prompt is prefilled."""
    last: int = 0
    """The token it sampled last: its input to the next step."""
    generator: Optional[torch.Generator] = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """The decode loop over ``model`` with room for ``max_batch`` running rows and ``max_queue``
    waiting requests; ``prefill_chunk`` prompt tokens per turn (0: a whole prompt at once); under
    ``autocast`` (bf16, say), when given."""

    def __init__(
        self,
        model,
        max_batch: int = 16,
        max_queue: int = 64,
        prefill_chunk: int = 32,
        autocast: Optional[torch.autocast] = None,
    ):
        self.model = model
        self.device = next(model.parameters()).device
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.autocast = autocast or torch.autocast(self.device.type, enabled=False)
        with self.autocast:  # the caches' dtype is what attention produces under it
            self.pool = RowPool(model.new_state(max_batch))
        self.rows: list[Job] = []
        """The running jobs, by row."""
        self.filling: Optional[Job] = None
        """The job whose prompt is being prefilled."""
        self.waiting: deque[Job] = deque()
        self.lock = threading.Condition()  # re-entrant: the loop counts an ending while it holds it
        self.stopping = False
        self.draining = False
        """Set on shutdown: no new job; those here get a grace period (``drain``)."""
        self.ended: Counter[str] = Counter()
        """Requests ended so far, by why (counted under the lock: consumers count their cancels too)."""
        self.failure: Optional[BaseException] = None
        """What ended the loop, if anything did (the server's health says so)."""
        self.thread = threading.Thread(target=self._run, name="modlm-decode", daemon=True)

    # --- the consumers' side (any thread) -------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; ``QueueFull`` when the waiting line is full, ``Stopped`` when shutting down."""
        with self.lock:
            if self.stopping or self.draining:
                raise Stopped("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(job)
            self.lock.notify()

    def cancel(self, job: Job) -> None:
        """Drop ``job`` (its client has gone): out of the line now, out of its row at the next turn."""
        with self.lock:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
                self.ended["cancelled"] += 1

    def drain(self, grace: float) -> None:
        """Take no new request; let the jobs here finish for ``grace`` seconds, then ``stop``."""
        with self.lock:
            self.draining = True
        timer = threading.Timer(grace, self.stop)
        timer.daemon = True
        timer.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Take no new request, end every job still here (``"error"``: the server stopped) and end the loop."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the loop runs and takes new jobs."""
        return self.thread.is_alive() and not (self.stopping or self.draining)

    def load(self) -> dict:
        """Running rows, requests waiting (and one being prefilled), row capacity, and how many
        requests have ended, by why (``stop``, ``length``, ``error``, ``cancelled``: its client went)."""
        with self.lock:  # a request is in one place: moves between them happen under the lock
            return {
                "running": self.pool.running,
                "waiting": len(self.waiting) + (self.filling is not None),
                "max_batch": self.pool.capacity,
                "ended": dict(self.ended),
            }

    # --- the loop (its own thread) -----------------------------------------------------------------
    @torch.inference_mode()
    def _run(self) -> None:
        try:
            while True:
                with self.lock:
                    while not (self.stopping or self.waiting or self.rows or self.filling):
                        self.lock.wait()
                    if self.stopping:
                        break
                try:
                    with self.autocast:
                        self._turn()
                except Exception as err:  # noqa: BLE001 - a failing turn fails its jobs, not the server
                    self._fail_all(f"the model failed: {type(err).__name__}: {err}")
        except BaseException as err:  # the loop itself broke: nothing can be served any more
            self.failure = err
            raise
        finally:
            self._fail_all("the server stopped before this request finished")
            with self.lock:
                for job in self.waiting:
                    self._finish(job, "error", "the server stopped before this request started")
                self.waiting.clear()

    def _turn(self) -> None:
        self._drop_cancelled()
        self._prefill()
        if self.rows:
            logits = self.model.decode_step(
                torch.tensor([job.last for job in self.rows], device=self.device), self.pool.state
            )
            for job, token in zip(self.rows, self._sample(self.rows, logits)):
                self._accept(job, token)
        self._release([row for row, job in enumerate(self.rows) if job.done])

    def _prefill(self) -> None:
        """One chunk of the next prompt; a prompt complete samples its first token and joins."""
        if self.filling is None:
            if len(self.rows) == self.pool.capacity:
                return
            with self.lock:
                if not self.waiting:
                    return
                job = self.filling = self.waiting.popleft()
            job.state = self.model.new_state(1)
            job.generator = _generator(job.sampling.seed, self.device)
        job = self.filling
        chunk = job.prompt[job.fed : job.fed + self.prefill_chunk] if self.prefill_chunk else job.prompt
        logits = self.model.prefill(torch.tensor([chunk], device=self.device), job.state, last_only=True)
        job.fed += len(chunk)
        if job.fed < len(job.prompt):
            return
        token = self._sample([job], logits)[0]
        with self.lock:  # from prefilled to running in one move, as load() sees it
            row = self.pool.join(job.state)
            assert row == len(self.rows)
            self.rows.append(job)
            self.filling = job.state = None
        # accepted once it runs: whoever sees its first text sees it running (its row, if that token ended
        # it, goes at once: the rows of a turn's step are jobs not done)
        self._accept(job, token)
        if job.done:
            self._release([row])

    def _sample(self, jobs: list[Job], logits: torch.Tensor) -> list[int]:
        """Each row's next token with its own settings: greedy rows by one argmax, the others one
        by one with their own generators (as ``modlm-generate`` samples a prompt alone)."""
        tokens = logits.float().argmax(dim=-1)
        for row, job in enumerate(jobs):
            s = job.sampling
            if s.temperature > 0:
                row_logits = logits[row : row + 1].float()
                tokens[row] = sample_next(row_logits, s.temperature, s.top_k, s.top_p, job.generator)[0]
        return tokens.tolist()

    def _accept(self, job: Job, token: int) -> None:
        job.completion_tokens += 1
        job.last = token
        if token == job.end_id:
            return self._finish(job, "stop")
        text = job.stream.push(token)
        if job.stream.stopped:
            return self._finish(job, "stop", text=text)
        if job.completion_tokens >= job.max_tokens:
            return self._finish(job, "length", text=text)
        if text:
            job.emit(Update(text))

    def _finish(self, job: Job, reason: str, error: Optional[str] = None, text: str = "") -> None:
        job.finish_reason = reason
        self._count(reason)
        if reason != "error":
            text += job.stream.finish()
        job.emit(Update(text, reason, error))

    def _drop_cancelled(self) -> None:
        if self.filling is not None and self.filling.cancelled:
            self.filling.state, self.filling = None, None
            self._count("cancelled")
        for job in self.rows:
            if job.cancelled and not job.done:
                job.finish_reason = "cancelled"
                self._count("cancelled")
        self._release([row for row, job in enumerate(self.rows) if job.done])

    def _count(self, reason: str) -> None:
        with self.lock:
            self.ended[reason] += 1

    def _release(self, rows: list[int]) -> None:
        if not rows:
            return
        jobs = self.rows
        moved = self.pool.release(rows)
        self.rows = jobs[: self.pool.running]  # the rows that stayed; the holes get the rows that moved
        for src, dst in moved.items():
            self.rows[dst] = jobs[src]

    def _fail_all(self, message: str) -> None:
        """End every job in a row or being prefilled with ``message``, and empty the rows."""
        for job in [*self.rows, *([self.filling] if self.filling else [])]:
            if not job.done:
                self._finish(job, "error", message)
        self.filling = None
        if self.rows:
            self.pool.release(list(range(len(self.rows))))
            self.rows = []


def _generator(seed: Optional[int], device) -> torch.Generator:
    """A request's own random stream: its ``seed``'s (the stream ``modlm-generate --seed`` samples
    with), or a fresh one."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
