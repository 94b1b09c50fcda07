"""`tunelab chat` as a user meets it: on a pseudo-terminal (streamed answers, history, /system, RESET, EXIT)
and from a pipe (one question per line, --json, greedy determinism), plus its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.infer.support import Terminal, build_other_base, make_adapter

FRANCE = "What is the capital of France?"
GERMANY = "And of Germany?"
SYSTEM = "You are a geography teacher. Answer in one short sentence."


@pytest.fixture(scope="module")
def real_chat(default_model_dir: Path):
    from tunelab.model.generate import load_chat_model

    return load_chat_model(str(default_model_dir), device="cpu")


def reference(chat, history, question, system, max_new_tokens):
    """The answer the generation core gives in this process (greedy), for comparison with the CLI's."""
    from tunelab.model.generate import GenerationOptions, conversation, generate

    return generate(chat, conversation(history, question, system), GenerationOptions(max_new_tokens=max_new_tokens))[0]


def answer_of(screen: str, question: str) -> str:
    """The answer printed between the echoed question and the next prompt."""
    body = screen.split(question, 1)[1]
    return body.rsplit(">>> ", 1)[0].strip()


def test_terminal_session_streams_keeps_history_and_obeys_commands(default_model_dir: Path, real_chat) -> None:
    term = Terminal("chat", str(default_model_dir), "--max-new-tokens", "40", "--device", "cpu")
    try:
        banner = term.read_until(">>> ", timeout=180)
        assert f"tunelab chat: {default_model_dir.name}" in banner and "RESET" in banner

        term.send(FRANCE)
        before = term.pos
        first = answer_of(term.read_until(">>> "), FRANCE)
        assert "Paris" in first
        # Streamed: some read from the terminal ended inside the answer, so it arrived in pieces.
        start = term.text.index(first, before)
        assert any(start < p < start + len(first) for _, p in term.reads), term.reads

        term.send(GERMANY)  # a follow-up that only makes sense with the history
        second = answer_of(term.read_until(">>> "), GERMANY)
        assert second == reference(real_chat, [(FRANCE, first)], GERMANY, None, 40)
        assert "Berlin" in second

        term.send(f"/system {SYSTEM}")
        assert "(system prompt set; history cleared)" in term.read_until(">>> ")
        term.send(FRANCE)
        with_system = answer_of(term.read_until(">>> "), FRANCE)
        assert with_system == reference(real_chat, [], FRANCE, SYSTEM, 40)

        term.send("RESET")
        assert "(history cleared)" in term.read_until(">>> ")
        term.send("EXIT")
        assert term.wait(timeout=60) == 0
        assert "Traceback" not in term.text
    finally:
        term.close()


def test_pipe_mode_json_is_deterministic_and_survives_a_too_long_prompt(tiny_model_dir: Path) -> None:
    too_long = "hello world " * 400  # ~800 tokens; the tiny model's context is 512
    questions = ["Who are you?", too_long, "/systematic review?", FRANCE]  # "/systematic" is no command
    stdin = "".join(q + "\r\n" for q in questions)  # Windows line ends too
    args = ("chat", str(tiny_model_dir), "--json", "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu")
    runs = [run_cli(*args, input=stdin, timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 1, r.stderr  # a question went unanswered: a script must be able to tell
        lines = r.stdout.strip().splitlines()
        records = [json.loads(line) for line in lines]
        # One JSON line per question, in order; the too-long one carries its error instead of an answer.
        assert [rec["question"] for rec in records] == questions
        assert "exceeds the model's context of 512 tokens" in records[1]["error"] and "answer" not in records[1]
        assert all(isinstance(rec["answer"], str) for rec in records[:1] + records[2:])
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "exceeds the model's context of 512 tokens" in errors[0], r.stderr
        assert "Traceback" not in r.stderr
    assert runs[0].stdout == runs[1].stdout  # greedy: the same answers every run


def test_pipe_mode_answers_each_line_on_its_own_unless_history(default_model_dir: Path, real_chat) -> None:
    """Piped questions are independent by default (a script's questions are); --history makes them one
    conversation, so the follow-up is answered in its context."""
    args = ("chat", str(default_model_dir), "--max-new-tokens", "24", "--device", "cpu")
    r = run_cli(*args, input=f"{FRANCE}\n{GERMANY}\n{FRANCE}\n", timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    alone = [reference(real_chat, [], q, None, 24) for q in (FRANCE, GERMANY)]
    assert lines == [alone[0], alone[1], alone[0]] and "Paris" in lines[0], r.stdout
    r = run_cli(*args, "--history", input=f"{FRANCE}\n{GERMANY}\n", timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    in_context = reference(real_chat, [(FRANCE, alone[0])], GERMANY, None, 24)
    assert lines == [alone[0], in_context] and in_context != alone[1], r.stdout
    assert "each line is answered on its own; --history" in " ".join(run_cli("chat", "--help").stdout.split())


def test_missing_model_is_one_line_error(tmp_path: Path) -> None:
    r = run_cli("chat", str(tmp_path / "no_such_model"), input="hi\n", timeout=120)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model folder not found:"), r.stderr


def test_adapter_of_another_base_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    other = build_other_base(tmp_path / "other_base", vocab)
    adapter = make_adapter(other, tmp_path / "other_adapter")
    r = run_cli("chat", str(tiny_model_dir), "--adapter", str(adapter), "--device", "cpu", input="hi\n",
                timeout=180)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "does not fit base model" in err[0] and "size mismatch" in err[0], r.stderr
