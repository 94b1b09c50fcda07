"""Which template chat, web, serve, export-app and eval use: the model folder's tunelab.json, else the tokenizer's
own chat template; --prompt-template overrides it with one warning; a broken sidecar is one clear error line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tunelab.data.sidecar import SIDECAR, TrainedPrompt, choose_template, write_sidecar
from tunelab.errors import DataError


def test_template_choice_follows_the_sidecar_and_the_flag_overrides(tiny_tokenizer, tmp_path, capsys):
    from tunelab import ui

    assert choose_template(None, str(tmp_path), tiny_tokenizer).name == "hf"  # no sidecar: the tokenizer's own
    write_sidecar(tmp_path, TrainedPrompt("gemma", "Sys", ("<end_of_turn>", "<x>")))
    chosen = choose_template(None, str(tmp_path), tiny_tokenizer)
    assert (chosen.name, chosen.system) == ("gemma", "Sys") and "<x>" in chosen.stop_words
    assert capsys.readouterr().err == f"prompt template gemma and system prompt from {tmp_path / SIDECAR}\n"
    ui.warning_counts.pop("prompt-template-differs", None)
    other = choose_template("qwen_chat", str(tmp_path), tiny_tokenizer)
    assert (other.name, other.system) == ("qwen_chat", "Sys")  # the run's system prompt still applies
    assert "differs from the template this model was trained with (gemma" in capsys.readouterr().err
    write_sidecar(tmp_path, TrainedPrompt("from_the_future"))
    with pytest.raises(DataError, match=r"tunelab\.json: prompt_template 'from_the_future' is not known"):
        choose_template(None, str(tmp_path), tiny_tokenizer)


def test_chat_with_a_broken_sidecar_is_one_line_error(tiny_model_dir: Path, tmp_path: Path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / SIDECAR).write_text("{oops")
    r = run_cli("chat", str(model), "--device", "cpu", input="hi\n", timeout=180)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert err == [(f"error: {model / SIDECAR}: not valid JSON (Expecting property name enclosed in double quotes, "
                    "line 1)")], r.stderr
