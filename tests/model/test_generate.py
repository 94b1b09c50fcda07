"""The generation core: how an answer ends (finish reason and token count, whole and streamed alike), prompts
given as ids, and a row of a batch cancelled while the others go on."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def real_chat(default_model_dir: Path):
    from tunelab.model.generate import load_chat_model

    return load_chat_model(str(default_model_dir), device="cpu")


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


def test_prompt_ids_answer_as_the_conversation_and_a_cancelled_row_stops(tiny_model_dir: Path) -> None:
    from tunelab.model.generate import (
        GenerationOptions,
        PromptTooLong,
        conversation,
        generate_from_ids,
        generate_many,
        load_chat_model,
        prompt_ids,
        stream_from_ids,
    )

    chat = load_chat_model(str(tiny_model_dir), device="cpu")
    opts = GenerationOptions(max_new_tokens=40)
    convs = [conversation([], q, None) for q in ("hello", "Who are you?")]
    ids = [prompt_ids(chat, c) for c in convs]
    want = generate_many(chat, convs, opts)
    assert generate_from_ids(chat, ids, opts) == want
    assert "".join(stream_from_ids(chat, ids[0], opts)).strip() == want[0].text
    assert [g.completion_tokens for g in want] == [40, 40]  # the tiny model talks to the limit

    cancel = [threading.Event(), threading.Event()]
    cancel[0].set()  # its reader left before the first token
    first, second = generate_from_ids(chat, ids, opts, cancel=cancel)
    assert first.completion_tokens == 1
    assert second == want[1]  # the other row is not disturbed
    with pytest.raises(PromptTooLong, match="exceeds the model's context of 512 tokens"):
        generate_from_ids(chat, [ids[0]], GenerationOptions(max_new_tokens=512))
