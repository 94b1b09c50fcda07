"""`tunelab serve` as a user runs it: a taken port is one error line, and a client that hangs up on a
non-streamed request stops its generation (the server's /health counters tell)."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import build_tiny_model
from tests.infer.support import assert_port_in_use_error, assert_stops_with_exit_0, free_port, server_process, \
    tunelab_cmd


def test_serve_port_in_use_is_one_line_error(tiny_model_dir: Path) -> None:
    assert_port_in_use_error("serve", tiny_model_dir)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_the_server_with_exit_0_also_from_a_background_job(tiny_model_dir: Path, sig) -> None:
    assert_stops_with_exit_0("serve", tiny_model_dir, sig, "/health")


def long_context_tiny_model(tiny_model_dir: Path, out: Path, context: int) -> Path:
    """The tiny model's tokenizer and architecture with a long context, so one answer can run for seconds."""
    out.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            (out / f.name).write_bytes(f.read_bytes())
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    build_tiny_model(out, vocab)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": context}))
    return out


def test_a_client_that_hangs_up_stops_its_generation(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = long_context_tiny_model(tiny_model_dir, tmp_path / "long", context=32768)
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def health() -> dict:
        return httpx.get(base + "/health", timeout=10, trust_env=False).json()

    def wait_for(condition, what: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while not condition(h := health()):
            assert time.monotonic() < deadline, f"waited {timeout:.0f}s for {what}: {h}"
            time.sleep(0.05)
        return h

    max_tokens = 30000  # minutes of work for the tiny model if nobody stops it
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": max_tokens}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with server_process(tunelab_cmd("serve", str(model), "--port", str(port), "--device", "cpu"), base + "/health"):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(request)
            wait_for(lambda h: h["running"] == 1, "the answer to start")
            time.sleep(0.5)  # well into it
        hung_up = time.monotonic()
        h = wait_for(lambda h: h["running"] == 0, "the generation to stop", timeout=30)
        stopped_after = time.monotonic() - hung_up
        assert (h["cancelled"], h["answered"]) == (1, 0), h
        assert 0 < h["completion_tokens"] < max_tokens // 4, h
        assert stopped_after < 5, stopped_after
        # and the server goes on answering
        r = httpx.post(base + "/v1/chat/completions", timeout=60, trust_env=False,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
