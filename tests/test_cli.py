"""The command line itself: version, env, list-cfg, copy-cfg, --debug, usage errors and exit codes."""

import re

import pytest

from tests.conftest import ROOT, run_cli
from tunelab.cli import build_parser


def test_version_and_env():
    res = run_cli("version")
    assert res.returncode == 0 and res.stdout.strip() == "tunelab 0.1.0"
    res = run_cli("env")
    assert res.returncode == 0
    for key in ("tunelab", "torch", "transformers", "peft", "bitsandbytes", "datasets", "cuda", "cache"):
        assert any(line.startswith(key) for line in res.stdout.splitlines()), key


def test_list_cfg_and_copy_cfg(tmp_path):
    res = run_cli("list-cfg", "-p", "internlm2_chat_1_8b")
    assert res.returncode == 0
    names = res.stdout.split()
    assert "internlm2_chat_1_8b_qlora_alpaca_e3" in names and all("internlm2_chat_1_8b" in n for n in names)
    res = run_cli("copy-cfg", "internlm2_chat_1_8b_qlora_alpaca_e3", str(tmp_path))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "internlm2_chat_1_8b_qlora_alpaca_e3_copy.yaml"
    assert out.exists() and "prompt_template: internlm2_chat" in out.read_text()
    before = out.read_text()
    res = run_cli("copy-cfg", "internlm2_chat_1_8b_qlora_alpaca_e3", str(tmp_path))
    assert res.returncode == 1 and "already exists" in res.stderr and out.read_text() == before
    res = run_cli("list-cfg", "-p", "no_such_model")
    assert res.returncode == 1 and res.stderr.strip() == "error: no built-in config matches 'no_such_model'"
    res = run_cli("list-cfg", "-p", "internlm2_1_8b")  # the tutorial's spelling
    assert res.returncode == 1 and "did you mean 'internlm2_chat_1_8b' (tunelab list-cfg -p internlm2_chat_1_8b)" \
        in res.stderr


def test_errors_are_one_line_unless_debug(tmp_path):
    res = run_cli("train", str(tmp_path / "missing.yaml"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"error: config file not found: {tmp_path / 'missing.yaml'} " \
                                 "(tunelab list-cfg lists built-in ones)"
    res = run_cli("--debug", "train", str(tmp_path / "missing.yaml"))
    assert res.returncode == 1 and "Traceback" in res.stderr
    res = run_cli("train", str(tmp_path / "missing.yaml"), "--debug")  # after the command too
    assert res.returncode == 1 and "Traceback" in res.stderr


def test_usage_errors_exit_2():
    assert run_cli("train").returncode == 2
    assert run_cli("convert", "merge", "only-one-arg").returncode == 2
    res = run_cli("chat", "m", "--bits", "3")
    assert res.returncode == 2 and "invalid choice" in res.stderr


@pytest.mark.parametrize("args,message", [
    (("chat", "m", "--top-k", "-1"), "argument --top-k: must be >= 0 (got -1)"),
    (("chat", "m", "--max-new-tokens", "0"), "argument --max-new-tokens: must be >= 1 (got 0)"),
    (("chat", "m", "--repetition-penalty", "0"), "argument --repetition-penalty: must be > 0 (got 0)"),
    (("chat", "m", "--top-p", "1.5"), "argument --top-p: must be > 0 and <= 1 (got 1.5)"),
    (("serve", "m", "--port", "70000"), "argument --port: must be >= 0 and <= 65535 (got 70000)"),
    (("web", "m", "--temperature", "warm"), "argument --temperature: not a number: warm"),
])
def test_bad_generation_flags_are_usage_errors(args, message):
    res = run_cli(*args)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


HIDE = "import sys; sys.modules[{module!r}] = None; from tunelab.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("command,module", [("serve", "fastapi"), ("web", "gradio")])
def test_a_missing_package_is_one_line_naming_the_pip_command(command, module, tmp_path):
    """The package is hidden from the import system in a real subprocess (no tunelab code is mocked)."""
    import subprocess
    import sys
    from pathlib import Path

    import tomllib

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith(f"{module}=="))
    res = subprocess.run([sys.executable, "-c", HIDE.format(module=module), command, str(tmp_path / "model")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"error: the Python package '{module}' is not installed; install it with: " \
                                 f"pip install '{pin}'"


def test_the_readme_chat_synopsis_lists_every_chat_option():
    """The README's one-line synopsis of `tunelab chat` is where users look first; it must not fall behind --help."""
    readme = (ROOT / "README.md").read_text()
    synopsis = readme[readme.index("`tunelab chat MODEL ["):]
    synopsis = synopsis[:synopsis.index("` streams answers")]
    chat = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "chat")[1]
    options = {o for action in chat._actions for o in action.option_strings if o.startswith("--")} - {"--help"}
    assert options and set(re.findall(r"--[a-z-]+", synopsis)) == options
