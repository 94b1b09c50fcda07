"""Rendered segments -> token ids and a loss mask, then shifted labels.

All segment texts of a dataset are tokenised in one batched call (the Rust tokenizer runs it on every core),
then re-assembled per sample. Each segment is tokenised on its own, so the prompt's tokens are exactly the
ones the model sees at chat time, when the prompt is tokenised without the reply.

`labels[t]` is the token to predict after reading `input_ids[: t + 1]`, or -100: labels are shifted here,
once, per sample, so no sample is ever trained to predict the first token of the next one in a packed row.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        fast = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return [e.ids for e in fast(list(texts), add_special_tokens=add_special_tokens)]
    return tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]


def encode_samples(samples: Sequence[Sample], segments: Sequence[Segments], tokenizer: Any) -> list[Encoded]:
    """Tokenise the rendered segments of many samples at once."""
    flat: list[str] = []
    doc_texts: list[str] = []
    for sample, segs in zip(samples, segments):
        if isinstance(sample, Document):
            doc_texts.append(segs[0][0])
        else:
            flat.extend(text for text, _ in segs)
    ids = tokenize_texts(tokenizer, flat)
    doc_ids = tokenize_texts(tokenizer, doc_texts, add_special_tokens=True)
    eos = tokenizer.eos_token_id
    out: list[Encoded] = []
    k = d = 0
    for sample, segs in zip(samples, segments):
        if isinstance(sample, Document):
            toks = list(doc_ids[d])
            d += 1
            if eos is not None and (not toks or toks[-1] != eos):
                toks.append(eos)  # documents are joined with EOS
            arr = np.asarray(toks, dtype=np.int32)
            out.append(Encoded(arr, np.ones(len(arr), dtype=bool)))
            continue
        parts = ids[k:k + len(segs)]
        k += len(segs)
        arr = np.fromiter((t for p in parts for t in p), dtype=np.int32, count=sum(map(len, parts)))
        mask = np.repeat(np.array([loss for _, loss in segs], dtype=bool), [len(p) for p in parts])
        out.append(Encoded(arr, mask))
    return out


def split_document(enc: Encoded, max_length: int) -> list[Encoded]:
    """Pre-training text longer than a row is cut into row-sized pieces instead of being thrown away."""
    return [Encoded(enc.input_ids[i:i + max_length], enc.loss_mask[i:i + max_length])
            for i in range(0, len(enc.input_ids), max_length)]


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
