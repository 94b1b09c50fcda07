"""Helpers for the chat, web, API and export-app tests: free loopback ports, servers run as subprocesses and
waited for (every wait bounded), an in-process API server, and a pseudo-terminal driver for `tunelab chat`."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> None:
    """Poll url until it answers 200; fail early if the server process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.output() if hasattr(proc, "output") else (proc.stdout.read() if proc.stdout else "")
            raise AssertionError(f"server exited with code {proc.returncode} before answering {url}:\n{out}")
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout:.0f}s")


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a server we started (its own process group), politely first."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Still running: SIGABRT makes Python's faulthandler (PYTHONFAULTHANDLER, set below) write every
            # thread's stack to the server's log, so the failing test shows where the shutdown hung.
            os.killpg(proc.pid, signal.SIGABRT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)


@contextmanager
def server_process(cmd: list[str], url: str, cwd: Path | None = None, env: dict | None = None,
                   timeout: float = 180.0, preexec_fn: Callable[[], Any] | None = None) -> Iterator[subprocess.Popen]:
    """Run cmd (a server) in its own process group until the block ends; yields once url answers."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                **(env or {})}
    # The server writes to a file, not a pipe nobody reads during the test: a full pipe would block its writes
    # (and its exit). `proc.output()` reads what it wrote so far.
    log = open(tempfile.mkstemp(prefix="server-", suffix=".log")[1], "w+", encoding="utf-8")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=preexec_fn)
    proc.output = lambda: Path(log.name).read_text(encoding="utf-8", errors="replace")  # type: ignore[attr-defined]
    try:
        wait_http(url, proc, timeout)
        yield proc
    finally:
        stop(proc)
        log.close()


def tunelab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tunelab", *args]


@contextmanager
def api_in_thread(app) -> Iterator[str]:
    """Serve a FastAPI app with uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    from tunelab.infer.ports import bind

    port = free_port()
    sock = bind("127.0.0.1", port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health", timeout=30)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


class Terminal:
    """`python -m tunelab ARGS` on a pseudo-terminal: type lines, read what it prints (ANSI codes removed)."""

    def __init__(self, *args: str, env: dict | None = None):
        master, slave = pty.openpty()
        # A wide terminal, so long answers are not wrapped by the line discipline.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
        self.proc = subprocess.Popen(tunelab_cmd(*args), stdin=slave, stdout=slave, stderr=slave,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb", **(env or {})},
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.fd = master
        self.text = ""  # everything read so far, cleaned
        self.pos = 0  # what read_until has handed out
        self.reads: list[tuple[float, int]] = []  # (time, position in text) of each read, to see streaming

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def read_until(self, needle: str, timeout: float = 120.0) -> str:
        """The output from the last call up to and including `needle`."""
        deadline = time.monotonic() + timeout
        while self.text.find(needle, self.pos) < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"waited {timeout:.0f}s for {needle!r}; the terminal shows:\n"
                                     f"{self.text[self.pos:][-3000:]}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if not ready:
                continue
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"the program ended (code {self.proc.poll()}) before printing {needle!r}:\n"
                                     f"{self.text[self.pos:][-3000:]}")
            self.text += ANSI.sub("", data.decode("utf-8", errors="replace")).replace("\r\n", "\n")
            self.reads.append((time.monotonic(), len(self.text)))
        end = self.text.find(needle, self.pos) + len(needle)
        out, self.pos = self.text[self.pos:end], end
        return out

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            # keep draining, so the child never blocks on a full terminal buffer
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.text += ANSI.sub("", os.read(self.fd, 65536).decode("utf-8", "replace"))
                except OSError:
                    pass
        if self.proc.poll() is None:
            raise AssertionError(f"tunelab chat did not exit within {timeout:.0f}s")
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        os.close(self.fd)


def make_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter for the model in `base`, with non-zero weights so it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(out))
    return out


def build_other_base(out: Path, vocab_size: int) -> Path:
    """A tiny Llama of another shape (hidden 48) than the shared tiny model (hidden 32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=3, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


def assert_port_in_use_error(command: str, model_dir: Path) -> None:
    """`tunelab web|serve` on a taken port: exit 1 with one error line, before loading the model."""
    from tests.conftest import run_cli

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        r = run_cli(command, str(model_dir), "--port", str(port), "--device", "cpu", timeout=180)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and f"port {port} on 127.0.0.1 is already in use" in err[0], r.stderr


def assert_stops_with_exit_0(command: str, model_dir: Path, sig: int, path: str = "/") -> None:
    """`tunelab web|serve` started as a shell starts a background job (SIGINT ignored) stops on `sig` with exit
    code 0 and says it stopped."""
    port = free_port()
    cmd = tunelab_cmd(command, str(model_dir), "--port", str(port), "--device", "cpu")
    ignore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731  (as `cmd &` does)
    with server_process(cmd, f"http://127.0.0.1:{port}{path}", preexec_fn=ignore_sigint) as proc:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
        assert proc.returncode == 0, proc.output()[-3000:]
        assert f"tunelab {command}: stopped" in proc.output()
