"""`tunelab chat`: talk to a model in the terminal, with streaming and multi-turn history.

At a terminal: a prompt per question, each answered with the conversation so far; RESET (or /reset) clears the
history, EXIT (or /exit, Ctrl-D) quits, `/system TEXT` sets the system prompt. From a pipe: one question per
line, each answered on its own (a script's questions are independent; with keep_history they are one
conversation), each answer printed (as JSON lines with --json).
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

from tunelab.model.generate import ChatModel, GenerationOptions, PromptTooLong, conversation, generate, \
    generate_stream

HELP = ("Type a question. RESET or /reset clears the history, /system TEXT sets the system prompt, "
        "EXIT, /exit or Ctrl-D quits.")


def run_chat(chat: ChatModel, opts: GenerationOptions, system: str | None = None, stream: bool = True,
             as_json: bool = False, keep_history: bool | None = None, stdin: TextIO | None = None,
             stdout: TextIO | None = None) -> int:
    """keep_history None: a conversation at a terminal, independent questions from a pipe."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty() and stdout.isatty()
    if keep_history is None:
        keep_history = stdin.isatty()
    history: list[tuple[str, str]] = []
    failures = 0
    if interactive:
        print(f"tunelab chat: {chat.name} (template {chat.renderer.name}). {HELP}", file=stdout)
    while True:
        if interactive:
            try:
                text = input("\n>>> ")
            except EOFError:
                print(file=stdout)
                break
        else:
            text = stdin.readline()
            if text == "":
                break
        text = text.rstrip("\r\n")
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("EXIT", "/exit", "/quit"):
            break
        if cmd in ("RESET", "/reset"):
            history.clear()
            if interactive:
                print("(history cleared)", file=stdout)
            continue
        if cmd == "/system" or cmd.startswith("/system "):
            system = cmd[len("/system"):].strip() or None
            history.clear()
            if interactive:
                print(f"(system prompt {'set' if system else 'cleared'}; history cleared)", file=stdout)
            continue
        conv = conversation(history if keep_history else [], text, system)
        try:
            if stream and not as_json:
                answer = ""
                for piece in generate_stream(chat, conv, opts):
                    answer += piece
                    stdout.write(piece)
                    stdout.flush()
                stdout.write("\n")
            else:
                answer = generate(chat, conv, opts)[0]
                print(json.dumps({"question": text, "answer": answer}, ensure_ascii=False) if as_json else answer,
                      file=stdout)
        except PromptTooLong as e:
            print(f"error: {e}; history cleared", file=sys.stderr)
            if as_json:  # one output line per question, so scripts can pair them
                print(json.dumps({"question": text, "error": str(e)}, ensure_ascii=False), file=stdout)
            history.clear()
            failures += 1
            continue
        stdout.flush()
        history.append((text, answer.strip()))
    # a script that piped questions in must see that some got no answer; a person at a terminal saw it
    return 1 if failures and not interactive else 0
