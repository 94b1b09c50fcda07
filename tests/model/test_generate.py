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


def test_an_answer_cut_by_the_token_limit_never_ends_in_half_a_character(real_chat) -> None:
    """SmolLM2's byte-level tokens split a Chinese character over several tokens: a limit that falls inside one
    leaves decoding a U+FFFD, which neither the whole nor the streamed answer may show."""
    from tunelab.model.generate import BROKEN, GenerationOptions, conversation, generate_many, generate_stream

    conv = conversation([], "请用中文介绍一下北京。", None)
    full = generate_many(real_chat, [conv], GenerationOptions(max_new_tokens=24))[0].text
    ids = real_chat.tokenizer.encode(full, add_special_tokens=False)
    cuts = [k for k in range(1, len(ids)) if real_chat.tokenizer.decode(ids[:k]).endswith(BROKEN)]
    assert cuts, full  # the case exists in this answer
    for limit in cuts[:3]:
        whole = generate_many(real_chat, [conv], GenerationOptions(max_new_tokens=limit))[0]
        streamed = "".join(generate_stream(real_chat, conv, GenerationOptions(max_new_tokens=limit)))
        assert whole.finish_reason == "length"
        assert not whole.text.endswith(BROKEN) and not streamed.rstrip().endswith(BROKEN), (limit, whole.text)
        assert full.startswith(whole.text.rstrip()) and full.startswith(streamed.strip())


def test_chat_with_an_adapter_answers_through_merged_weights_as_peft_would(tiny_model_dir: Path, tmp_path: Path):
    """An adapter on a plain base is merged at load (one matmul per layer); its answers stay the adapter's."""
    import torch

    from tests.infer.support import make_adapter
    from tunelab.model.adapters import attach_adapter
    from tunelab.model.generate import load_chat_model
    from tunelab.model.load import load_model

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    chat = load_chat_model(str(tiny_model_dir), adapter=str(adapter), device="cpu")
    assert not any(hasattr(m, "lora_A") for m in chat.model.modules())
    cpu = torch.device("cpu")
    unmerged = attach_adapter(load_model(str(tiny_model_dir), dtype=torch.float32, device=cpu), str(adapter),
                              str(tiny_model_dir)).eval()
    base = load_model(str(tiny_model_dir), dtype=torch.float32, device=cpu).eval()
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, plain = (m(input_ids=ids).logits for m in (chat.model, unmerged, base))
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the answers ...
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # ... and merged, it still does the same


def test_decoding_on_a_gpu_leaves_out_cudnn_attention_and_restores_it_afterwards() -> None:
    import torch

    from tunelab.model.generate import decoding_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        with decoding_attention(torch.device("cuda")):  # sets torch's SDPA flags only: no GPU needed to check them
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled()
        with decoding_attention(torch.device("cpu")):
            assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
