"""`tunelab web` in a real browser: Debian's Chromium, driven by Playwright, against the real default model on a
loopback port. Chromium must be installed (`apt-get install -y chromium`); without it this test fails."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.infer.support import assert_port_in_use_error, assert_stops_with_exit_0, free_port, server_process, \
    tunelab_cmd

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
BOT = "#chatbot [data-testid='bot']"
USER = "#chatbot [data-testid='user']"

# Records every distinct text of the newest bot message, to see the answer arrive in pieces.
WATCH = """() => {
  window.__snapshots = [];
  const box = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bots = box.querySelectorAll("[data-testid='bot']");
    const t = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    const s = window.__snapshots;
    if (t && s[s.length - 1] !== t) s.push(t);
  }).observe(box, {subtree: true, childList: true, characterData: true});
}"""


def settled_text(page, selector: str, must_contain: str | None = None, timeout: float = 180.0) -> str:
    """The last matching element's text once it has stopped changing (and holds `must_contain`)."""
    deadline = time.monotonic() + timeout
    last, stable_since = None, time.monotonic()
    while time.monotonic() < deadline:
        items = page.locator(selector)
        text = items.nth(items.count() - 1).inner_text().strip() if items.count() else ""
        if text != last:
            last, stable_since = text, time.monotonic()
        elif text and (must_contain is None or must_contain in text) and time.monotonic() - stable_since > 2.0:
            return text
        time.sleep(0.25)
    raise AssertionError(f"no settled answer in {selector} after {timeout:.0f}s; last text: {last!r}")


def test_web_page_answers_in_browser(default_model_dir: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Chromium is missing: install it with `apt-get install -y chromium`"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = tunelab_cmd("web", str(default_model_dir), "--port", str(port), "--max-new-tokens", "48",
                      "--device", "cpu")
    with server_process(cmd, url, timeout=240) as proc, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url, timeout=60_000)
            page.wait_for_selector("#question textarea", timeout=60_000)
            assert default_model_dir.name in page.title()
            assert default_model_dir.name in page.inner_text("#model-name")
            page.evaluate(WATCH)

            page.fill("#question textarea", "What is the capital of France?")
            page.click("#send")
            answer = settled_text(page, BOT, must_contain="Paris")
            assert "Paris" in answer
            snapshots = page.evaluate("window.__snapshots")
            # Streamed: the bot message showed a shorter prefix of the answer before the whole of it.
            assert any(len(s) < len(answer) and answer.startswith(s) for s in snapshots), snapshots
            assert page.input_value("#question textarea") == ""

            shot = tmp_path / "web_chat.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            assert shot.stat().st_size > 10_000

            # History: a follow-up that needs the first turn, answered by pressing Enter.
            page.fill("#question textarea", "And of Germany?")
            page.press("#question textarea", "Enter")
            follow = settled_text(page, BOT, must_contain="Berlin")
            assert "Berlin" in follow and page.locator(BOT).count() == 2

            # The settings: a system prompt box and the four sampling controls.
            page.click("#settings button.label-wrap")
            for elem in ("#system textarea", "#temperature input", "#top_p input", "#top_k input",
                         "#max_new_tokens input"):
                page.locator(elem).first.wait_for(state="visible", timeout=15_000)
            assert page.locator("#max_new_tokens input").first.input_value() == "48"

            page.click("#clear")
            page.wait_for_function("document.querySelectorAll(\"#chatbot [data-testid='user']\").length === 0",
                                   timeout=30_000)
            assert page.locator(BOT).count() == 0

            # The controls reach the model: 3 new tokens give the start of the same greedy answer, and the
            # cleared history does not leak into it.
            limit = page.locator("#max_new_tokens input").first
            limit.fill("3")
            limit.press("Enter")
            page.fill("#question textarea", "What is the capital of France?")
            page.click("#send")
            short = settled_text(page, BOT)
            assert page.locator(BOT).count() == 1
            assert len(short) < len(answer) and answer.startswith(short), (short, answer)
        finally:
            browser.close()
    assert proc.returncode == 0, proc.output()[-3000:]  # Ctrl-C (SIGINT) stops the server cleanly


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_the_page_cleanly_also_from_a_background_job(tiny_model_dir: Path, sig) -> None:
    assert_stops_with_exit_0("web", tiny_model_dir, sig)


def test_web_port_in_use_is_one_line_error(tiny_model_dir: Path) -> None:
    assert_port_in_use_error("web", tiny_model_dir)


def test_page_builds_and_reports_a_too_long_prompt(tiny_model_dir: Path) -> None:
    import gradio as gr

    from tunelab.infer.web import answer_stream, build_app
    from tunelab.model.generate import GenerationOptions, conversation, generate, load_chat_model

    chat = load_chat_model(str(tiny_model_dir), device="cpu")
    opts = GenerationOptions(max_new_tokens=8)
    app = build_app(chat, system="Be brief.", defaults=opts)
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"model-name", "chatbot", "question", "send", "clear", "system", "temperature", "top_p", "top_k",
            "max_new_tokens"} <= ids

    steps = list(answer_stream(chat, opts, "Who are you?", [], "Be brief.", 0, 1, 0, 8))
    box, messages, history = steps[-1]
    want = generate(chat, conversation([], "Who are you?", "Be brief."), opts)[0]
    assert box == "" and history == [("Who are you?", want)] and messages[-1]["content"] == want

    with pytest.raises(gr.Error, match="exceeds the model's context of 512 tokens"):
        list(answer_stream(chat, opts, "hello world " * 400, history, None, 0, 1, 0, 8))
