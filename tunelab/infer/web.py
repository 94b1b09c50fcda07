"""`tunelab web`: a Gradio chat page in front of the generation core.

This module owns the page only: layout, streamed answers, history, the clear button, the system prompt box and
the sampling controls. Every answer comes from `generate_stream` on a `conversation(history, question, system)`;
there is no model code here. `build_app` returns the page unlaunched (tests use it); `serve_web` binds it.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace
from typing import Any, Iterator

from tunelab.errors import TunelabError
from tunelab.infer.ports import ensure_port_free
from tunelab.model.generate import ChatModel, GenerationOptions, PromptTooLong, conversation, generate_stream

History = list[tuple[str, str]]


def _messages(history: History, question: str | None = None, partial: str | None = None) -> list[dict]:
    """Chatbot messages for the finished turns, plus the turn being answered."""
    out: list[dict] = []
    for q, a in history:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if question is not None:
        out.append({"role": "user", "content": question})
        out.append({"role": "assistant", "content": partial or ""})
    return out


def answer_stream(chat: ChatModel, defaults: GenerationOptions, question: str, history: History,
                  system: str | None, temperature: float, top_p: float, top_k: int,
                  max_new_tokens: int) -> Iterator[tuple[str, list[dict], History]]:
    """(textbox value, chatbot messages, history) after each streamed piece; the last one ends the turn."""
    import gradio as gr

    question = (question or "").strip()
    history = list(history or [])
    if not question:
        yield "", _messages(history), history
        return
    opts = replace(defaults, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                   max_new_tokens=int(max_new_tokens))
    conv = conversation(history, question, (system or "").strip() or None)
    answer = ""
    try:
        for piece in generate_stream(chat, conv, opts):
            answer += piece
            yield "", _messages(history, question, answer), history
    except PromptTooLong as e:
        # Keep the question in the box so nothing typed is lost; the toast says what to do.
        raise gr.Error(f"{e}. Clear the chat or lower 'max new tokens'.") from None
    history.append((question, answer.strip()))
    yield "", _messages(history), history


def build_app(chat: ChatModel, system: str | None = None, defaults: GenerationOptions | None = None) -> Any:
    """The chat page as an unlaunched `gr.Blocks`."""
    import gradio as gr

    defaults = defaults or GenerationOptions()
    max_tokens_cap = max(1, min(4096, chat.context_length))
    with gr.Blocks(title=f"tunelab · {chat.name}", analytics_enabled=False, fill_height=True) as app:
        gr.Markdown(f"### {chat.name}\n<small>prompt template: {chat.renderer.name} · "
                    f"context {chat.context_length} tokens</small>", elem_id="model-name")
        history = gr.State([])
        chatbot = gr.Chatbot(label=chat.name, elem_id="chatbot", height=460, buttons=["copy"],
                             feedback_options=None)
        with gr.Row():
            question = gr.Textbox(placeholder="Ask something and press Enter", show_label=False, lines=1,
                                  max_lines=8, scale=8, elem_id="question", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
            clear = gr.Button("Clear", scale=1, min_width=80, elem_id="clear")
        with gr.Accordion("System prompt and sampling", open=False, elem_id="settings"):
            system_box = gr.Textbox(value=system or "", label="System prompt", lines=2, elem_id="system")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=min(max(defaults.temperature, 0.0), 2.0), step=0.05,
                                        label="Temperature (0 = greedy)", elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=min(max(defaults.top_p, 0.05), 1.0), step=0.05,
                                  label="Top-p", elem_id="top_p")
            with gr.Row():
                top_k = gr.Slider(0, 200, value=min(max(defaults.top_k, 0), 200), step=1,
                                  label="Top-k (0 = off)", elem_id="top_k")
                max_new = gr.Slider(1, max_tokens_cap, value=min(max(defaults.max_new_tokens, 1), max_tokens_cap),
                                    step=1, label="Max new tokens", elem_id="max_new_tokens")

        def respond(q, h, s, t, p, k, m):
            yield from answer_stream(chat, defaults, q, h, s, t, p, k, m)

        inputs = [question, history, system_box, temperature, top_p, top_k, max_new]
        outputs = [question, chatbot, history]
        # One model, one lock: answers run one at a time (the queue's default concurrency of 1).
        question.submit(respond, inputs, outputs, api_name="chat")
        send.click(respond, inputs, outputs, api_visibility="private")
        clear.click(lambda: ("", [], []), None, [question, chatbot, history], api_name="clear")
        chatbot.clear(lambda: [], None, history, api_visibility="private")  # its own trash icon
    return app


def serve_web(chat: ChatModel, host: str, port: int, system: str | None, defaults: GenerationOptions) -> int:
    """Serve the page on host:port until Ctrl-C."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    ensure_port_free(host, port)
    app = build_app(chat, system, defaults)
    app.queue(default_concurrency_limit=1)
    # Ctrl-C and SIGTERM (`kill`, `docker stop`) both close the page and exit 0, as `tunelab serve` does. The
    # handlers are set here, before the page answers, rather than left to Python, which keeps SIGINT ignored in a
    # process a shell started in the background.
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                       inbrowser=False, ssr_mode=False, show_error=True, footer_links=["api"])
        except OSError as e:
            raise TunelabError(f"cannot serve the web page on {host}:{port}: {e}") from None
        shown = f"[{host}]" if ":" in host else host
        print(f"tunelab web: {chat.name} at http://{shown}:{port}/ (Ctrl-C to stop)", flush=True)
        while app.is_running and not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        app.close()
    print("tunelab web: stopped", flush=True)
    return 0
