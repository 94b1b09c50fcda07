"""Servers shared by the API tests: the real default model behind the app in a thread (greedy answers worth
reading), and the tiny model (context 512) for the context-length cases."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.infer.support import api_in_thread

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="package")
def real_chat(default_model_dir: Path):
    from tunelab.model.generate import load_chat_model

    return load_chat_model(str(default_model_dir), device="cpu")


@pytest.fixture(scope="package")
def base_url(real_chat):
    from tunelab.infer.api.routes import build_api
    from tunelab.model.generate import GenerationOptions

    app = build_api(real_chat, system=None, defaults=GenerationOptions(max_new_tokens=64), model_name="smol-test")
    with api_in_thread(app) as base:
        yield base


@pytest.fixture(scope="package")
def tiny_url(tiny_model_dir: Path):
    from tunelab.infer.api.routes import build_api
    from tunelab.model.generate import GenerationOptions, load_chat_model

    chat = load_chat_model(str(tiny_model_dir), device="cpu")
    with api_in_thread(build_api(chat, defaults=GenerationOptions(max_new_tokens=16))) as base:
        yield base


@pytest.fixture()
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(client: openai.OpenAI, content: str = QUESTION, **kw):
    return client.chat.completions.create(model="smol-test", messages=[{"role": "user", "content": content}], **kw)
