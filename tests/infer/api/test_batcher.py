"""The batcher: queued greedy requests answered together and each as if alone, streams waiting their turn, and
requests whose client went away dropped while they wait and stopped while they run."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.infer.api.conftest import QUESTION
from tests.infer.support import api_in_thread
from tunelab.infer.api.batcher import Counters


def test_queued_greedy_requests_are_batched_and_answer_as_alone(real_chat) -> None:
    """Eight requests in flight at once: the batcher answers the queued ones together (fewer model calls than
    requests), and each answer equals the one the same request gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from tunelab.infer.api import batcher as batcher_module
    from tunelab.infer.api.routes import build_api
    from tunelab.model.generate import GenerationOptions

    calls: list[int] = []
    real = batcher_module.generate_from_ids

    def counting(chat, prompts, opts, batch_size=16, cancel=None):
        calls.append(len(prompts))
        return real(chat, prompts, opts, batch_size, cancel)

    batcher_module.generate_from_ids = counting
    try:
        app = build_api(real_chat, defaults=GenerationOptions(max_new_tokens=12), max_batch=8)
        with api_in_thread(app) as base:
            body = {"model": "m", "temperature": 0, "max_tokens": 12,
                    "messages": [{"role": "user", "content": QUESTION}]}
            alone = httpx.post(base + "/v1/chat/completions", json=body, timeout=300, trust_env=False).json()
            calls.clear()
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda _: httpx.post(base + "/v1/chat/completions", json=body, timeout=300,
                                                             trust_env=False).json(), range(8)))
    finally:
        batcher_module.generate_from_ids = real
    want = alone["choices"][0]["message"]["content"]
    assert all(a["choices"][0]["message"]["content"] == want for a in answers)
    assert all(a["usage"] == alone["usage"] for a in answers)
    assert sum(calls) == 8 and len(calls) < 8 and max(calls) > 1, calls


def test_batcher_serves_streams_in_line_and_drops_a_request_whose_client_left(tiny_model_dir: Path) -> None:
    import time

    from tunelab.infer.api.batcher import Batcher
    from tunelab.model.generate import GenerationOptions, conversation, load_chat_model, prompt_ids

    chat = load_chat_model(str(tiny_model_dir), device="cpu")
    opts = GenerationOptions(max_new_tokens=4)
    ids = prompt_ids(chat, conversation([], "hello", None))
    batcher = Batcher(chat, max_batch=1)
    place = batcher.reserve_stream()  # a streamed request arrived first
    later = batcher.submit(ids, opts)
    assert place.turn.wait(10)
    time.sleep(0.5)
    assert not later.future.done()  # it waits for the stream that came before it
    place.tokens = 3
    place.done.set()
    assert later.future.result(timeout=60).completion_tokens == 4

    first, gone = batcher.submit(ids, opts), batcher.submit(ids, opts)
    assert gone.future.cancel()  # its caller gave up while it was queued
    assert first.future.result(timeout=60).completion_tokens == 4
    assert batcher.submit(ids, opts).future.result(timeout=60).completion_tokens == 4  # the worker still serves
    wait_idle(batcher)
    assert batcher.counters == Counters(answered=4, cancelled=1, completion_tokens=3 + 4 + 4 + 4)


def test_a_running_request_whose_client_left_stops_at_its_next_token(tiny_model_dir: Path) -> None:
    """Two requests batched together; one client leaves while they run: its row stops at its next token, the
    other runs to its max_new_tokens and answers as it would alone."""
    from tunelab.infer.api.batcher import Batcher
    from tunelab.model.generate import GenerationOptions, conversation, generate_many, load_chat_model, prompt_ids

    chat = load_chat_model(str(tiny_model_dir), device="cpu")
    opts = GenerationOptions(max_new_tokens=400)
    conv = conversation([], "hello", None)
    alone = generate_many(chat, [conv], opts)[0]
    assert alone.completion_tokens == 400  # the tiny model talks to the limit
    batcher = Batcher(chat, max_batch=2)
    place = batcher.reserve_stream()  # holds the worker until both are queued, so they run as one batch
    assert place.turn.wait(10)
    stays, leaves = batcher.submit(prompt_ids(chat, conv), opts), batcher.submit(prompt_ids(chat, conv), opts)
    steps: list[int] = []

    def client_leaves_at_step_10(*_) -> None:
        steps.append(1)
        if len(steps) == 10:
            leaves.cancel.set()

    chat.model.register_forward_hook(client_leaves_at_step_10)
    place.done.set()
    assert leaves.future.result(timeout=60).completion_tokens == 10
    kept = stays.future.result(timeout=60)
    assert (kept.text, kept.completion_tokens) == (alone.text, 400)
    wait_idle(batcher)
    assert batcher.counters == Counters(answered=2, cancelled=1, completion_tokens=410)


def wait_idle(batcher, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while batcher.counters.running or batcher.counters.queued:
        assert time.monotonic() < deadline, batcher.counters
        time.sleep(0.05)
