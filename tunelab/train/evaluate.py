"""Chat samples during training: at every evaluation_freq steps and at the end, answer the config's
evaluation_inputs greedily and write them to the run folder, so a person sees the model change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunelab.data.formats import Conversation, Message
from tunelab.model.generate import ChatModel, GenerationOptions, generate_batch
from tunelab.model.kernels import generation_mode


def evaluate_chat(chat: ChatModel, inputs: list[str], system: str | None, max_new_tokens: int) -> list[dict[str, Any]]:
    convs = [Conversation(([Message("system", system)] if system else []) + [Message("user", q)]) for q in inputs]
    model = chat.model
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[chat.device] if chat.device.type == "cuda" else []), \
                generation_mode(model):
            answers = generate_batch(chat, convs, GenerationOptions(max_new_tokens=max_new_tokens))
    finally:
        if was_training:
            model.train()
    return [{"question": q, "answer": a} for q, a in zip(inputs, answers)]


def write_eval(log_dir: Path, step: int, results: list[dict[str, Any]]) -> Path:
    out = log_dir / "eval_outputs.jsonl"
    with open(out, "a", encoding="utf-8") as f:
        f.writelines(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n" for r in results)
    return out
