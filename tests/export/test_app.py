"""`tunelab export-app`: the folder's contents, its bad inputs, the copied app's generation stopping at a stop word,
and the real thing: a fresh virtual environment built from the generated requirements.txt runs app.py, whose page
answers over HTTP exactly as tunelab does."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import psutil
import pytest

from tests.conftest import run_cli
from tests.infer.support import build_other_base, free_port, make_adapter, server_process

SYSTEM = "Be brief."


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny_adapter") / "adapter")


def imports_of(source: str) -> set[str]:
    tree = ast.parse(source)
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def installed(dist: str) -> str:
    return metadata.version(dist).split("+")[0]


def test_export_folder_contents_and_overwrite_rule(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "space"
    r = run_cli("export-app", str(tiny_model_dir), str(out), "--prompt-template", "qwen_chat", "--system", SYSTEM,
                timeout=180)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [".gitattributes", "README.md", "app.py", "app_config.json",
                                                     "model", "requirements.txt"]
    assert sorted(p.name for p in (out / "model").iterdir()) == sorted(
        p.name for p in tiny_model_dir.iterdir() if p.is_file())
    assert (out / "model" / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()

    reqs = (out / "requirements.txt").read_text().split()
    assert reqs == [f"{d}=={installed(d)}" for d in ("torch", "transformers", "gradio", "safetensors", "tokenizers")]

    app_py = (out / "app.py").read_text()
    assert "tunelab" not in imports_of(app_py)
    assert imports_of(app_py) <= {"json", "os", "threading", "pathlib", "gradio", "torch", "transformers", "peft"}
    assert 'or "127.0.0.1"' in app_py and "GRADIO_SERVER_PORT" in app_py

    readme = (out / "README.md").read_text()
    front = readme.split("---\n")[1]
    assert "sdk: gradio\n" in front and "app_file: app.py\n" in front and f"sdk_version: {installed('gradio')}" in front
    assert "`qwen_chat`" in readme

    cfg = json.loads((out / "app_config.json").read_text())
    assert cfg["template_name"] == "qwen_chat" and cfg["system"] == SYSTEM and cfg["hub_id"] is None
    assert cfg["stop_words"] == ["<|im_end|>", "<|endoftext|>"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    tok.chat_template = cfg["chat_template"]  # what app.py does
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True) \
        == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

    before = sorted(p.name for p in out.rglob("*"))
    again = run_cli("export-app", str(tiny_model_dir), str(out), timeout=180)
    assert again.returncode == 1
    err = again.stderr.strip().splitlines()
    assert len(err) == 1 and "already exists and is not empty" in err[0] and "--overwrite" in err[0]
    assert sorted(p.name for p in out.rglob("*")) == before

    hub = run_cli("export-app", str(tiny_model_dir), str(out), "--hub-id", "someone/tiny-chat", "--overwrite",
                  timeout=180)
    assert hub.returncode == 0, hub.stderr
    assert not (out / "model").exists()
    assert json.loads((out / "app_config.json").read_text())["hub_id"] == "someone/tiny-chat"


def test_export_refuses_bad_inputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    other = make_adapter(build_other_base(tmp_path / "other", vocab), tmp_path / "other_adapter")
    cases = [
        ((str(tiny_model_dir), str(tmp_path / "a"), "--adapter", str(other)), "does not fit base model"),
        ((str(tmp_path / "ghost"), str(tmp_path / "b")), "model folder not found"),
        ((str(tiny_model_dir), str(tmp_path / "c"), "--prompt-template", "qwen_chatt"), "did you mean 'qwen_chat'"),
        ((str(tiny_model_dir), str(tmp_path / "d"), "--adapter", str(tmp_path)), "is not a PEFT adapter folder"),
    ]
    for args, text in cases:
        r = run_cli("export-app", *args, timeout=180)
        assert r.returncode == 1, (args, r.stderr)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and text in err[0], (args, r.stderr)
        assert not Path(args[1]).exists()  # nothing half-written


def test_app_template_is_the_copied_app_and_imports_no_tunelab(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tunelab.export.app import TEMPLATE, export_app

    out = export_app(str(tiny_model_dir), tmp_path / "space")
    assert (out / "app.py").read_bytes() == TEMPLATE.read_bytes()
    assert "tunelab" not in imports_of(TEMPLATE.read_text())


def load_exported(folder: Path):
    """The exported folder's app.py as a module (not run as __main__: nothing is launched)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"exported_app_{folder.name}", folder / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exported_app_stops_generating_at_a_stop_word(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The app's own answer function on the tiny model: with a stop word from app_config.json the model stops at
    the token that completes it (fewer forward passes), not at max_new_tokens with the text trimmed afterwards."""
    from tunelab.export.app import export_app

    out = export_app(str(tiny_model_dir), tmp_path / "space")
    cfg_file = out / "app_config.json"
    module = load_exported(out)

    def run(stop_words: list[str]) -> tuple[str, int]:
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "stop_words": stop_words}))
        app = module.ChatApp(out)
        calls: list[int] = []
        app.model.register_forward_hook(lambda *_: calls.append(1))
        *_, final = app.answer("Who are you?", [], "", 0.0, 1.0, 0, 48)
        return final, len(calls)

    free, free_calls = run([])
    assert free_calls == 48 and len(free) > 30, free  # the tiny model talks to the limit without a stop word
    stop = free[len(free) // 3:len(free) // 3 + 6]
    cut, cut_calls = run([stop])
    assert cut == free[:free.index(stop)].removesuffix(module.BROKEN).strip()  # an answer never ends in U+FFFD
    assert cut_calls < free_calls * 2 // 3, (cut_calls, free_calls)  # it stopped there, not just trimmed


def ask(client, question: str) -> str:
    """One turn through the page's own chat endpoint (greedy, 12 new tokens); the latest answer."""
    _, messages = client.predict(question, SYSTEM, 0, 1, 0, 12, api_name="/chat")
    last = messages[-1]
    assert last["role"] == "assistant"
    return "".join(part["text"] for part in last["content"])


def listening_hosts(pid: int) -> set[str]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {c.laddr.ip for p in procs for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def test_exported_app_runs_in_a_fresh_venv(tiny_model_dir: Path, tiny_adapter: Path, tmp_path: Path) -> None:
    from gradio_client import Client

    from tunelab.model.generate import GenerationOptions, conversation, generate, load_chat_model

    with_adapter, templated = tmp_path / "space_adapter", tmp_path / "space_template"
    assert run_cli("export-app", str(tiny_model_dir), str(with_adapter), "--adapter", str(tiny_adapter),
                   timeout=180).returncode == 0
    assert run_cli("export-app", str(tiny_model_dir), str(templated), "--prompt-template", "qwen_chat",
                   timeout=180).returncode == 0
    reqs = (with_adapter / "requirements.txt").read_text()
    assert f"peft=={installed('peft')}" in reqs

    venv = tmp_path / "venv"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(with_adapter / "requirements.txt")],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    print(f"fresh venv from requirements.txt: {time.monotonic() - t0:.0f}s")
    python = str(venv / "bin" / "python")
    bare_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a worktree on PYTHONPATH is no install
    fresh = subprocess.run([python, "-c", "import tunelab"], capture_output=True, cwd=tmp_path, env=bare_env,
                           check=False)
    assert fresh.returncode != 0  # really fresh: tunelab is not in it

    references = {
        with_adapter: load_chat_model(str(tiny_model_dir), adapter=str(tiny_adapter), device="cpu"),
        templated: load_chat_model(str(tiny_model_dir), template="qwen_chat", device="cpu"),
    }
    opts = GenerationOptions(max_new_tokens=12)
    for folder, chat in references.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        env = {"GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
        with server_process([python, "app.py"], url, cwd=folder, env=env, timeout=180) as proc:
            assert listening_hosts(proc.pid) == {"127.0.0.1"}
            client = Client(url, verbose=False)
            first = ask(client, "Who are you?")
            assert first.strip(), folder.name  # a real answer, not an empty match
            assert first == generate(chat, conversation([], "Who are you?", SYSTEM), opts)[0], folder.name
            # A second turn: the page keeps the history, rendered the way tunelab renders it.
            second = ask(client, "What is the capital of France?")
            want = generate(chat, conversation([("Who are you?", first)], "What is the capital of France?", SYSTEM),
                            opts)[0]
            assert second == want, folder.name
