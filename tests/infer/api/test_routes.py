"""The OpenAI-compatible API, driven by the official `openai` client and raw HTTP on loopback: whole and streamed
answers, usage counts, stop words, seeds, models, malformed and oversized requests, a bounded load test, and the
`tunelab serve` command's port-in-use error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ROOT
from tests.infer.support import assert_port_in_use_error, api_in_thread

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def real_chat(default_model_dir: Path):
    from tunelab.model.generate import load_chat_model

    return load_chat_model(str(default_model_dir), device="cpu")


@pytest.fixture(scope="module")
def base_url(real_chat):
    from tunelab.infer.api import build_api
    from tunelab.model.generate import GenerationOptions

    app = build_api(real_chat, system=None, defaults=GenerationOptions(max_new_tokens=64), model_name="smol-test")
    with api_in_thread(app) as base:
        yield base


@pytest.fixture(scope="module")
def tiny_url(tiny_model_dir: Path):
    """A server on the tiny model (context 512), for the context-length cases."""
    from tunelab.infer.api import build_api
    from tunelab.model.generate import GenerationOptions, load_chat_model

    chat = load_chat_model(str(tiny_model_dir), device="cpu")
    with api_in_thread(build_api(chat, defaults=GenerationOptions(max_new_tokens=16))) as base:
        yield base


@pytest.fixture()
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(client: openai.OpenAI, content: str = QUESTION, **kw):
    return client.chat.completions.create(model="smol-test", messages=[{"role": "user", "content": content}], **kw)


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["smol-test"]
    assert models.data[0].owned_by == "tunelab"


def test_completion_answer_and_usage(client: openai.OpenAI, real_chat) -> None:
    from tunelab.model.generate import conversation, prompt_ids

    r = ask(client, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.model == "smol-test"
    text = r.choices[0].message.content
    assert "Paris" in text and r.choices[0].message.role == "assistant"
    n_prompt = len(prompt_ids(real_chat, conversation([], QUESTION, None)))
    assert r.usage.prompt_tokens == n_prompt
    assert 1 <= r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == "stop"

    short = ask(client, max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert text.startswith(short.choices[0].message.content)


def test_streaming_matches_whole_answer(client: openai.OpenAI) -> None:
    whole = ask(client, max_tokens=24, temperature=0).choices[0].message.content
    chunks = list(ask(client, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # streamed, not one blob
    assert "".join(pieces).strip() == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_raw_stream_is_openai_sse(base_url: str) -> None:
    body = {"model": "x", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=120, trust_env=False) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert set(first) >= {"id", "object", "created", "model", "choices"} and "usage" not in first
    assert first["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}


def test_client_leaving_mid_stream_does_not_block_the_server(base_url: str, client: openai.OpenAI) -> None:
    body = {"model": "x", "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
            "max_tokens": 24, "stream": True}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=120, trust_env=False) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(5)]  # the role chunk and the first pieces, then hang up
    assert any('"content": "' in g for g in got[1:])
    r = ask(client, max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].message.content or r.usage.completion_tokens == 8


def test_stop_words_string_and_list(client: openai.OpenAI) -> None:
    full = ask(client, max_tokens=24, temperature=0).choices[0].message.content
    assert "Paris" in full
    cut = ask(client, max_tokens=24, temperature=0, stop="Paris").choices[0].message.content
    assert cut == full[:full.index("Paris")].strip()
    cut2 = ask(client, max_tokens=24, temperature=0, stop=["zzz", "France"]).choices[0].message.content
    assert "France" not in cut2 and full.startswith(cut2)
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       ask(client, max_tokens=24, temperature=0, stop=["Paris"], stream=True) if c.choices)
    assert streamed.strip() == cut


def test_seed_and_temperature(client: openai.OpenAI) -> None:
    story = "Write one sentence about a cat."
    a = ask(client, story, max_tokens=12, temperature=1.2, top_p=0.95, seed=1234).choices[0].message.content
    b = ask(client, story, max_tokens=12, temperature=1.2, top_p=0.95, seed=1234).choices[0].message.content
    assert a == b  # same seed, same sample
    other = ask(client, story, max_tokens=12, temperature=1.2, top_p=0.95, seed=1).choices[0].message.content
    assert other != a  # another seed, another sample
    g1 = ask(client, story, max_tokens=12, temperature=0).choices[0].message.content
    g2 = ask(client, story, max_tokens=12, temperature=0, seed=99).choices[0].message.content
    assert g1 == g2  # greedy ignores the seed


def test_system_and_history_messages(client: openai.OpenAI, real_chat) -> None:
    from tunelab.model.generate import GenerationOptions, conversation, generate

    messages = [{"role": "system", "content": "You are a geography teacher."},
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": "The capital of France is Paris."},
                {"role": "user", "content": [{"type": "text", "text": "And of Germany?"}]}]
    r = client.chat.completions.create(model="smol-test", messages=messages, max_tokens=20, temperature=0)
    want = generate(real_chat, conversation([(QUESTION, "The capital of France is Paris.")], "And of Germany?",
                                            "You are a geography teacher."), GenerationOptions(max_new_tokens=20))
    assert r.choices[0].message.content == want[0]
    assert r.usage.prompt_tokens == want[1]


@pytest.mark.parametrize("payload, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_type"),
    (b'{"model": "x"}', 400, "messages", "missing_required_parameter"),
    (b'{"messages": []}', 400, "messages", "invalid_value"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages[0].role", "invalid_value"),
    (b'{"messages": [{"role": "assistant", "content": "hi"}]}', 400, "messages[0].role", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content", "invalid_type"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400, "temperature",
     "invalid_type"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 7}', 400, "temperature", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": [1]}', 400, "stop", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "stream", "invalid_type"),
    (b"[" * 100_000 + b"]" * 100_000, 400, None, "invalid_json"),  # nested deeper than the parser's stack
    (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', 400, None, "invalid_value"),  # lone surrogate
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": "' + b"x" * 3000 + b'"}', 400, "stop",
     "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": "no"}}',
     400, "stream_options.include_usage", "invalid_type"),
])
def test_malformed_requests_get_openai_errors(base_url: str, payload: bytes, status: int, param, code) -> None:
    r = httpx.post(base_url + "/v1/chat/completions", content=payload, timeout=60, trust_env=False,
                   headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code
    assert err["message"]


def test_client_sees_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol-test", messages=[], max_tokens=4)
    assert e.value.status_code == 400 and e.value.body["param"] == "messages"


def test_oversized_body_is_413(base_url: str) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}).encode()
    r = httpx.post(base_url + "/v1/chat/completions", content=big, timeout=60, trust_env=False)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unknown_route_and_method(base_url: str) -> None:
    r = httpx.get(base_url + "/v1/nothing", timeout=30, trust_env=False)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(base_url + "/v1/chat/completions", timeout=30, trust_env=False)
    assert r.status_code == 405 and "error" in r.json()


def test_too_long_prompt_then_still_serving(tiny_url: str) -> None:
    c = openai.OpenAI(base_url=tiny_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    long_text = "hello world " * 400  # ~800 tokens > context 512
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="t", messages=[{"role": "user", "content": long_text}])
    assert e.value.body["code"] == "context_length_exceeded" and "512" in e.value.body["message"]
    # A prompt that fits but leaves too little room for max_tokens
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="t", messages=[{"role": "user", "content": "hello world " * 100}],
                                  max_tokens=500)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        list(c.chat.completions.create(model="t", messages=[{"role": "user", "content": long_text}], stream=True))
    r = c.chat.completions.create(model="t", messages=[{"role": "user", "content": "Who are you?"}], max_tokens=5)
    assert r.usage.completion_tokens == 5  # the server still answers


def test_bounded_load_zero_failures(base_url: str) -> None:
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run_load(base_url, requests=12, concurrency=4, max_tokens=8, timeout=300)
    print(json.dumps(result))
    assert result["failures"] == 0, result["first_failures"]
    assert result["requests"] == 12 and result["completion_tokens"] > 0
    assert 0 < result["p50_s"] <= result["p95_s"] <= result["max_s"]


def test_serve_port_in_use_is_one_line_error(tiny_model_dir: Path) -> None:
    assert_port_in_use_error("serve", tiny_model_dir)


def test_queued_greedy_requests_are_batched_and_answer_as_alone(real_chat) -> None:
    """Eight requests in flight at once: the batcher answers the queued ones together (fewer model calls than
    requests), and each answer equals the one the same request gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from tunelab.infer.api import routes as api_module
    from tunelab.infer.api import build_api
    from tunelab.model.generate import GenerationOptions

    calls: list[int] = []
    real_many = api_module.generate_many

    def counting(chat, convs, opts, batch_size=16):
        calls.append(len(convs))
        return real_many(chat, convs, opts, batch_size)

    api_module.generate_many = counting
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
        api_module.generate_many = real_many
    want = alone["choices"][0]["message"]["content"]
    assert all(a["choices"][0]["message"]["content"] == want for a in answers)
    assert all(a["usage"] == alone["usage"] for a in answers)
    assert sum(calls) == 8 and len(calls) < 8 and max(calls) > 1, calls


def test_finish_reason_is_stop_when_the_end_token_is_the_last_allowed_one(real_chat) -> None:
    from tunelab.model.generate import GenerationOptions, StreamStats, conversation, generate_many, generate_stream

    conv = conversation([], QUESTION, None)
    free = generate_many(real_chat, [conv], GenerationOptions(max_new_tokens=64))[0]
    n = free.completion_tokens  # the answer's tokens, its end-of-turn token included
    assert free.finish_reason == "stop" and n < 64
    for limit, reason in ((n, "stop"), (n - 1, "length")):
        whole = generate_many(real_chat, [conv], GenerationOptions(max_new_tokens=limit))[0]
        stats = StreamStats()
        "".join(generate_stream(real_chat, conv, GenerationOptions(max_new_tokens=limit), stats))
        assert (whole.finish_reason, stats.finish_reason) == (reason, reason), limit
        assert whole.completion_tokens == stats.completion_tokens == limit


def test_batcher_serves_streams_in_line_and_survives_a_cancelled_request(tiny_model_dir: Path) -> None:
    import time

    from tunelab.infer.api import Batcher
    from tunelab.model.generate import GenerationOptions, conversation, load_chat_model

    chat = load_chat_model(str(tiny_model_dir), device="cpu")
    opts = GenerationOptions(max_new_tokens=4)
    conv = conversation([], "hello", None)
    batcher = Batcher(chat, max_batch=1)
    place = batcher.reserve_stream()  # a streamed request arrived first
    later = batcher.submit(conv, opts)
    assert place.turn.wait(10)
    time.sleep(0.5)
    assert not later.done()  # it waits for the stream that came before it
    place.done.set()
    assert later.result(timeout=60).completion_tokens >= 1

    first, gone = batcher.submit(conv, opts), batcher.submit(conv, opts)
    assert gone.cancel()  # its caller gave up while it was queued
    assert first.result(timeout=60).completion_tokens >= 1
    assert batcher.submit(conv, opts).result(timeout=60).completion_tokens >= 1  # the worker still serves
