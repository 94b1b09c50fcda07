"""One worker thread owns the model and answers requests in arrival order, streamed or not. When the model frees
up, the request at the head of the line runs together with the queued ones behind it that ask for the same
greedy generation (the simple case: one set of options, no sampling); a CPU answers eight such requests in one
batch much faster than one after another. A request whose client went away is dropped while it waits, and
stopped at its next token while it runs; the others in its batch go on."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from tunelab.model.generate import ChatModel, GenerationOptions, generate_from_ids


@dataclass
class Job:
    prompt: list[int]
    opts: GenerationOptions
    future: Future = field(default_factory=Future)
    cancel: threading.Event = field(default_factory=threading.Event)  # set when the client went away
    # A streamed request waits in the same line; at its turn the worker hands it the model (`turn`) and waits
    # until its stream ends (`done`), which reports its `tokens`.
    stream: bool = False
    turn: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    tokens: int = 0


@dataclass
class Counters:
    """What the server has done (GET /health shows it): requests answered, those whose client went away, and
    the tokens generated for all of them."""

    queued: int = 0
    running: int = 0
    answered: int = 0
    cancelled: int = 0
    completion_tokens: int = 0


class Batcher:
    def __init__(self, chat: ChatModel, max_batch: int = 8):
        self.chat = chat
        self.max_batch = max_batch
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.counters = Counters()
        threading.Thread(target=self._serve, name="tunelab-batcher", daemon=True).start()

    def submit(self, prompt: list[int], opts: GenerationOptions) -> Job:
        """A whole answer: wait on job.future; set job.cancel if the client goes away."""
        return self._enqueue(Job(prompt, opts))

    def reserve_stream(self) -> Job:
        """A place in line for a streamed request: wait for `turn`, stream, set `tokens` and `cancel` (if the
        client went away), then `done`."""
        return self._enqueue(Job([], GenerationOptions(), stream=True))

    def _enqueue(self, job: Job) -> Job:
        with self.cond:
            self.pending.append(job)
            self.counters.queued += 1
            self.cond.notify()
        return job

    def _take(self) -> list[Job]:
        with self.cond:
            while not self.pending:
                self.cond.wait()
            head = self.pending.popleft()
            batch, skipped = [head], []
            if head.opts.temperature == 0 and not head.stream:
                while self.pending and len(batch) < self.max_batch:
                    job = self.pending.popleft()
                    (batch if job.opts == head.opts and not job.stream else skipped).append(job)
                self.pending.extendleft(reversed(skipped))  # the others keep their place in line
            self.counters.queued -= len(batch)
            return batch

    def _serve(self) -> None:
        while True:
            taken = self._take()
            self._count(running=len(taken))
            if taken[0].stream:
                taken[0].turn.set()
                taken[0].done.wait()
                self._finished(taken)
                continue
            for j in taken:
                if j.cancel.is_set():  # its client left while it waited: dropped
                    j.future.cancel()
            batch = [j for j in taken if j.future.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)
            self._finished(taken)

    def _run(self, batch: list[Job]) -> None:
        try:
            results = generate_from_ids(self.chat, [j.prompt for j in batch], batch[0].opts,
                                        batch_size=len(batch), cancel=[j.cancel for j in batch])
        except BaseException as e:  # handed to every request of the batch
            for j in batch:
                j.future.set_exception(e)
            return
        for j, r in zip(batch, results):
            j.tokens = r.completion_tokens
            j.future.set_result(r)

    def _finished(self, jobs: list[Job]) -> None:
        gone = sum(j.cancel.is_set() or j.future.cancelled() for j in jobs)
        self._count(running=-len(jobs), answered=len(jobs) - gone, cancelled=gone,
                    completion_tokens=sum(j.tokens for j in jobs))

    def _count(self, **changes: int) -> None:
        with self.cond:
            for k, v in changes.items():
                setattr(self.counters, k, getattr(self.counters, k) + v)
