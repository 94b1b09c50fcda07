"""The one generation core behind chat, the web page, the API, self-cognition evaluation and the samples
written during training (it sits below train/, export/ and infer/, which all use it).

Load a base model (optionally with a PEFT adapter, optionally 4/8-bit), render the conversation with the same
prompt template used in training, generate with stop words, greedily or by sampling, whole or streamed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.data.encode import encode_for_generation
from tunelab.data.formats import Conversation, Message
from tunelab.data.sidecar import choose_template, prompt_folders
from tunelab.data.templates import Renderer, stop_token_ids
from tunelab.errors import TunelabError
from tunelab.model.adapters import attach_adapter, check_adapter
from tunelab.model.load import choose_device, load_model, load_tokenizer, resolve_model_path

# What decoding shows for the bytes of a character that the token limit cut in two (one, however many bytes are
# missing): an answer never ends in it, here and in the exported app (export/app_template/app.py).
BROKEN = "\ufffd"


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_words: list[str] = field(default_factory=list)


@dataclass
class ChatModel:
    model: Any
    tokenizer: Any
    renderer: Renderer
    device: torch.device
    name: str
    context_length: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def stop_words(self) -> list[str]:
        return list(self.renderer.stop_words)


class PromptTooLong(TunelabError):
    pass


def load_chat_model(path: str, adapter: str | None = None, bits: int | None = None, template: str | None = None,
                    trust_remote_code: bool = False, device: str = "auto") -> ChatModel:
    dev = choose_device(device)
    resolved = resolve_model_path(path)
    prompt_dir, tokenizer_dir = prompt_folders(resolved, adapter)
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
    renderer = choose_template(template, prompt_dir, tokenizer)  # before the weights: a bad name fails fast
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    quant = {None: "none", 4: "nf4", 8: "int8"}[bits]
    if adapter:
        check_adapter(adapter, resolved, trust_remote_code)  # before the weights are loaded
    model = load_model(resolved, dtype=dtype, device=dev, quantization=quant, trust_remote_code=trust_remote_code)
    if adapter:
        model = attach_adapter(model, adapter, resolved)
        if quant == "none":  # answers as `tunelab merge`'s folder would: one matmul per layer instead of peft's
            try:  # four and its Python, twice as fast per token (bench/generation_probe.py)
                model = model.merge_and_unload()
            except (NotImplementedError, ValueError):  # adapters peft cannot merge (aLoRA, layer replication)
                pass
    model.eval()
    model.config.use_cache = True
    ctx = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    label = Path(resolved).name + (f" + {Path(adapter).name}" if adapter else "")
    return ChatModel(model, tokenizer, renderer, dev, label, ctx)


def conversation(history: Sequence[tuple[str, str]], question: str, system: str | None) -> Conversation:
    msgs = [Message("system", system)] if system else []
    for q, a in history:
        msgs += [Message("user", q), Message("assistant", a)]
    msgs.append(Message("user", question))
    return Conversation(msgs)


def prompt_ids(chat: ChatModel, conv: Conversation, max_new_tokens: int = 0) -> list[int]:
    ids = encode_for_generation(conv, chat.renderer, chat.tokenizer)
    check_room(chat, len(ids), max_new_tokens)
    return ids


def check_room(chat: ChatModel, n_prompt: int, max_new_tokens: int) -> None:
    if n_prompt + max_new_tokens > chat.context_length:
        raise PromptTooLong(f"the prompt is {n_prompt} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                            f"the model's context of {chat.context_length} tokens")


def _cancellable(events: Sequence[threading.Event]) -> Any:
    """Stopping criteria that end row i at its next token once events[i] is set (its reader went away); the
    other rows of the batch go on."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
            return torch.tensor([e.is_set() for e in events], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Cancelled()])


def _generate_kwargs(chat: ChatModel, opts: GenerationOptions) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": opts.max_new_tokens, "pad_token_id": chat.tokenizer.pad_token_id,
                          "repetition_penalty": opts.repetition_penalty, "use_cache": True}
    # template stop words that are not one token are matched as text, like the user's
    stop_ids, multi_token = stop_token_ids(chat.tokenizer, chat.stop_words)
    eos = {chat.tokenizer.eos_token_id, *stop_ids}
    kw["eos_token_id"] = sorted(t for t in eos if t is not None)
    text_stops = [w for w in [*opts.stop_words, *multi_token] if w]
    if text_stops:
        kw["stop_strings"] = text_stops
        kw["tokenizer"] = chat.tokenizer
    if opts.temperature and opts.temperature > 0:
        kw.update(do_sample=True, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k or None)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def _trim(text: str, stops: Sequence[str]) -> str:
    cut = len(text)
    for s in stops:
        if s:
            j = text.find(s)
            if j >= 0:
                cut = min(cut, j)
    return text[:cut]


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop word) or "length" (max_new_tokens reached)


def decoding_attention(device: torch.device) -> Any:
    """SDPA without its cuDNN backend while decoding: cuDNN builds a plan the first time it meets a key length, so
    for every new token of the first answers (a 1.8B run's first evaluation, 2 x 128 tokens on an H100: 9.1 s, 5.5 s
    of it in SDPA; without cuDNN 3.0 s, the next evaluation 2.4 s; BENCHMARKS.md). FlashAttention and the
    memory-efficient kernel need no plan. The flags are process-wide: every caller holds its ChatModel's lock, so
    two generations never interleave setting and restoring them."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def generate(chat: ChatModel, conv: Conversation, opts: GenerationOptions) -> tuple[str, int, int]:
    """(answer, prompt tokens, generated tokens)."""
    g = generate_many(chat, [conv], opts)[0]
    return g.text, g.prompt_tokens, g.completion_tokens


def generate_many(chat: ChatModel, convs: Sequence[Conversation], opts: GenerationOptions,
                  batch_size: int = 16) -> list[Generated]:
    """Answers for many conversations, batched with left padding (one batch of one is plain generation)."""
    prompts = [prompt_ids(chat, c, opts.max_new_tokens) for c in convs]
    return generate_from_ids(chat, prompts, opts, batch_size)


def generate_from_ids(chat: ChatModel, prompts: Sequence[list[int]], opts: GenerationOptions, batch_size: int = 16,
                      cancel: Sequence[threading.Event] | None = None) -> list[Generated]:
    """generate_many for prompts already tokenised (the API tokenises each request once, when it reads it).
    `cancel[i]`, once set, ends prompt i's answer at its next token."""
    out: list[Generated] = []
    pad = chat.tokenizer.pad_token_id
    stops = [*opts.stop_words, *chat.stop_words]
    kwargs = _generate_kwargs(chat, opts)
    ends = set(kwargs["eos_token_id"])
    for start in range(0, len(prompts), batch_size):
        group = prompts[start:start + batch_size]
        for ids in group:
            check_room(chat, len(ids), opts.max_new_tokens)
        width = max(map(len, group))
        inp = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, ids in enumerate(group):
            inp[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        if cancel is not None:
            kwargs["stopping_criteria"] = _cancellable(cancel[start:start + batch_size])
        with chat.lock, torch.inference_mode(), decoding_attention(chat.device):
            if opts.seed is not None:
                torch.manual_seed(opts.seed)
            gen = chat.model.generate(input_ids=inp.to(chat.device), attention_mask=mask.to(chat.device), **kwargs)
        for ids, row in zip(group, gen[:, width:].tolist()):
            # A finished row is padded to the longest: count up to and including its end-of-turn token, or
            # up to the first padding after a stop word (or a cancellation).
            n = next((i + 1 if t in ends else i for i, t in enumerate(row) if t in ends or t == pad), len(row))
            raw = chat.tokenizer.decode(row[:n], skip_special_tokens=True)
            text = _trim(raw, stops)
            ended = n < len(row) or (n > 0 and row[n - 1] in ends)
            reason = "stop" if ended or len(text) < len(raw) or n < opts.max_new_tokens else "length"
            text = text.removesuffix(BROKEN)  # a character whose bytes the token limit cut in two
            out.append(Generated(text.strip(), len(ids), n, reason))
    return out


@dataclass
class StreamStats:
    """Filled in by generate_stream as it runs: token counts and why generation ended."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "stop" (end of turn or stop word) or "length" (max_new_tokens reached)


def generate_stream(chat: ChatModel, conv: Conversation, opts: GenerationOptions,
                    stats: StreamStats | None = None) -> Iterator[str]:
    """Yield the answer in pieces as tokens arrive; stop words are never shown, even partly. Closing the
    generator early (a client that went away) stops the model at its next token."""
    yield from stream_from_ids(chat, prompt_ids(chat, conv, opts.max_new_tokens), opts, stats)


def stream_from_ids(chat: ChatModel, ids: list[int], opts: GenerationOptions,
                    stats: StreamStats | None = None) -> Iterator[str]:
    """generate_stream for a prompt already tokenised."""
    from transformers import TextIteratorStreamer

    class CountingStreamer(TextIteratorStreamer):
        generated = 0
        last = -1  # the last generated token id

        def put(self, value: torch.Tensor) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.generated += value.numel()
                self.last = int(value.reshape(-1)[-1])
            super().put(value)

    check_room(chat, len(ids), opts.max_new_tokens)
    stats = stats if stats is not None else StreamStats()
    stats.prompt_tokens = len(ids)
    streamer = CountingStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    stops = [s for s in [*opts.stop_words, *chat.stop_words] if s]
    kwargs = _generate_kwargs(chat, opts)
    errors: list[BaseException] = []
    cancel = threading.Event()

    def run() -> None:
        try:
            with torch.inference_mode(), decoding_attention(chat.device):
                if opts.seed is not None:
                    torch.manual_seed(opts.seed)
                inp = torch.tensor([ids], device=chat.device)
                chat.model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), streamer=streamer,
                                    stopping_criteria=_cancellable([cancel]), **kwargs)
        except BaseException as e:  # surfaced to the caller below
            errors.append(e)
            streamer.end()

    with chat.lock:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            shown = 0
            text = ""
            stopped = False
            for piece in streamer:
                if stopped:
                    continue
                text += piece
                cut = _trim(text, stops)
                if len(cut) < len(text):
                    stopped = True
                    text = cut
                    cancel.set()  # nothing after a stop word is shown: stop computing it
                # hold back a tail that could be the start of a stop word
                hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                hold = max(hold, 1 if text.endswith(BROKEN) else 0)  # the token limit may cut a character
                visible = len(text) - (0 if stopped else hold)
                if visible > shown:
                    yield text[shown:visible]
                    shown = visible
            worker.join()
            if errors:
                raise errors[0]
            tail = text[shown:].removesuffix(BROKEN)
            if not stopped and tail:
                yield tail
            ended = stopped or streamer.last in kwargs["eos_token_id"]
            stats.finish_reason = "length" if streamer.generated >= opts.max_new_tokens and not ended else "stop"
        finally:
            cancel.set()  # a consumer that stopped early: end generation before the lock is released
            worker.join()
            stats.completion_tokens = streamer.generated


def generate_batch(chat: ChatModel, convs: Sequence[Conversation], opts: GenerationOptions,
                   batch_size: int = 16) -> list[str]:
    """Just the answers of generate_many (evaluation, replay data, the demo)."""
    return [g.text for g in generate_many(chat, convs, opts, batch_size)]


def from_training(model: Any, tokenizer: Any, renderer: Renderer, device: torch.device) -> ChatModel:
    """A ChatModel around a model being trained (for evaluation during training)."""
    ctx = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    return ChatModel(model, tokenizer, renderer, device, "training", ctx)
