"""The OpenAI-compatible routes, driven by the official `openai` client and raw HTTP on loopback: whole and
streamed answers, usage counts, stop words, seeds, models, unknown routes, too long prompts, a bounded load
test, and the counters /health shows."""

from __future__ import annotations

import importlib.util
import json

import httpx
import openai
import pytest

from tests.conftest import ROOT
from tests.infer.api.conftest import QUESTION, ask


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


def test_health_counts_answers_and_tokens(base_url: str, client: openai.OpenAI) -> None:
    def health() -> dict:
        return httpx.get(base_url + "/health", timeout=30, trust_env=False).json()

    before = health()
    r = ask(client, max_tokens=5, temperature=0)
    after = health()
    assert (after["status"], after["model"]) == ("ok", "smol-test")
    assert after["answered"] == before["answered"] + 1 and after["cancelled"] == before["cancelled"]
    assert after["completion_tokens"] == before["completion_tokens"] + r.usage.completion_tokens
    assert after["running"] == after["queued"] == 0
