"""Rendered segments -> token ids and a loss mask, then shifted labels.

All segment texts of a dataset are tokenised in one batched call (the Rust tokenizer runs it on every core),
then re-assembled per sample. Each segment is tokenised on its own, so the prompt's tokens are exactly the
ones the model sees at chat time, when the prompt is tokenised without the reply.

`labels[t]` is the token to predict after reading `input_ids[: t + 1]`, or -100: labels are shifted here,
once, per sample, so no sample is ever trained to predict the first token of the next one in a packed row.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any, Sequence

import numpy as np

from tunelab.data.formats import Conversation, Document, Sample
from tunelab.data.templates import Renderer, Segments, apply_system

IGNORE = -100


@dataclass
class Encoded:
    input_ids: np.ndarray  # int32
    loss_mask: np.ndarray  # bool: this token is a training target


def render(sample: Sample, renderer: Renderer, system: str | None) -> Segments:
    if isinstance(sample, Document):
        return [(sample.text, True)]
    return renderer.render(apply_system(sample, system))


def tokenize_texts(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    ids, offsets = tokenize_flat(tokenizer, texts, add_special_tokens)
    return [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def tokenize_flat(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """All texts' token ids in one int32 array, and offsets (text i is ids[offsets[i]:offsets[i+1]])."""
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    if not texts:
        return np.zeros(0, dtype=np.int32), offsets
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        fast = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        parts = [e.ids for e in fast(list(texts), add_special_tokens=add_special_tokens)]
    else:
        parts = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return np.fromiter(chain.from_iterable(parts), dtype=np.int32, count=int(offsets[-1])), offsets


def encode_samples(samples: Sequence[Sample], segments: Sequence[Segments], tokenizer: Any) -> list[Encoded]:
    """Tokenise the rendered segments of many samples at once."""
    flat: list[str] = []
    flags: list[bool] = []
    doc_texts: list[str] = []
    for sample, segs in zip(samples, segments):
        if isinstance(sample, Document):
            doc_texts.append(segs[0][0])
        else:
            flat.extend(text for text, _ in segs)
            flags.extend(loss for _, loss in segs)
    ids, offsets = tokenize_flat(tokenizer, flat)
    # one loss flag per token: each segment's flag repeated over its tokens
    mask = np.repeat(np.asarray(flags, dtype=bool), np.diff(offsets))
    doc_ids = tokenize_texts(tokenizer, doc_texts, add_special_tokens=True)
    eos = tokenizer.eos_token_id
    out: list[Encoded] = []
    k = d = 0
    for sample, segs in zip(samples, segments):
        if isinstance(sample, Document):
            toks = doc_ids[d]
            d += 1
            if eos is not None and (not toks or toks[-1] != eos):
                toks.append(eos)  # documents are joined with EOS
            arr = np.asarray(toks, dtype=np.int32)
            out.append(Encoded(arr, np.ones(len(arr), dtype=bool)))
            continue
        a, b = offsets[k], offsets[k + len(segs)]
        k += len(segs)
        out.append(Encoded(ids[a:b], mask[a:b]))
    return out


def split_document(enc: Encoded, max_length: int) -> list[Encoded]:
    """Pre-training text longer than a row is cut into row-sized pieces instead of being thrown away. Each piece
    after the first starts with the previous piece's last token: a piece's first token is never a target, so
    without the overlap the token at every cut would never be trained on (and a last piece of one token would
    be dropped). With it, every token after the document's first is a target exactly once."""
    n = len(enc.input_ids)
    if n <= max_length:
        return [enc]
    step = max(max_length - 1, 1)  # rows of one token have no target whatever the step
    return [Encoded(enc.input_ids[i:i + max_length], enc.loss_mask[i:i + max_length])
            for i in range(0, n - 1, step)]


def shifted_labels(enc: Encoded) -> np.ndarray:
    labels = np.full(len(enc.input_ids), IGNORE, dtype=np.int32)
    if len(enc.input_ids) > 1:
        nxt = enc.input_ids[1:]
        labels[:-1] = np.where(enc.loss_mask[1:], nxt, IGNORE)
    return labels


def encode_for_generation(conv: Conversation, renderer: Renderer, tokenizer: Any) -> list[int]:
    """Prompt token ids for a conversation whose last message is the user's."""
    segs = renderer.render(conv, add_generation_prompt=True)
    return [t for p in tokenize_texts(tokenizer, [s for s, _ in segs]) for t in p]
