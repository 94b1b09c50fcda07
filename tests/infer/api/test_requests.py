"""Reading a chat completion request: malformed and oversized bodies get OpenAI's error bodies (type, param,
code), the messages are checked as data/formats checks records, and a prompt is tokenised once per request."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.infer.api.conftest import QUESTION


@pytest.mark.parametrize("payload, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_type"),
    (b'{"model": "x"}', 400, "messages", "missing_required_parameter"),
    (b'{"messages": []}', 400, "messages", "invalid_value"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages[0].role", "invalid_value"),
    (b'{"messages": [{"role": "assistant", "content": "hi"}]}', 400, "messages[0].role", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content", "invalid_type"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "messages[0].content",
     "invalid_type"),
    (b'{"messages": "hi"}', 400, "messages", "invalid_type"),
    (b'{"messages": ["hi"]}', 400, "messages[0]", "invalid_type"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', 400, "messages[1].role",
     "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}', 400,
     "messages[1].role", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', 400, "messages",
     "invalid_value"),
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


def test_request_messages_become_the_conversation_the_core_renders(real_chat) -> None:
    """developer = system, text parts joined, the server's system prompt unless the request has one (an empty
    one asks for none); the prompt ids are the core's own for that conversation."""
    from tunelab.infer.api.requests import parse_request
    from tunelab.model.generate import GenerationOptions, conversation, prompt_ids

    defaults = GenerationOptions(max_new_tokens=8)
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Paris."},
               {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "Rome?"}]}]
    cases = [
        ([{"role": "developer", "content": "Be brief."}, *history], "Server says hi.", "Be brief."),
        (history, "Server says hi.", "Server says hi."),
        ([{"role": "system", "content": ""}, *history], "Server says hi.", None),
    ]
    for messages, server_system, system in cases:
        req = parse_request({"messages": messages}, real_chat, defaults, server_system)
        want = conversation([(QUESTION, "Paris.")], "And Rome?", system)
        assert req.prompt == prompt_ids(real_chat, want), system
        assert (req.opts.max_new_tokens, req.stream, req.include_usage) == (8, False, False)


def test_a_prompt_is_tokenised_once_per_request(base_url: str, monkeypatch) -> None:
    """Whole and streamed: the ids read with the request are the ones generation uses."""
    from tunelab.data import encode
    from tunelab.infer.api import requests
    from tunelab.model import generate

    calls: list[int] = []

    def counting(*args, **kw):
        calls.append(1)
        return encode.encode_for_generation(*args, **kw)

    monkeypatch.setattr(requests, "encode_for_generation", counting)
    monkeypatch.setattr(generate, "encode_for_generation", counting)
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4}
    r = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120, trust_env=False)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert len(calls) == 1
    with httpx.stream("POST", base_url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120,
                      trust_env=False) as r:
        assert r.status_code == 200 and "".join(r.iter_text()).endswith("data: [DONE]\n\n")
    assert len(calls) == 2
