"""Relative paths on the command line resolve against the current directory, for every command that takes one:
train's --work-dir and data.path=/model.path= overrides, the output folders of convert to-hf, convert merge and
export-app, and the model folder of chat. The config lives in another folder, so a path resolved against it (or
against the work folder, the demo's old bug) would miss."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.conftest import chat_records, run_cli, write_jsonl


@pytest.fixture(scope="module")
def cwd_and_config(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("relative")
    conf, cwd = root / "conf", root / "cwd"
    conf.mkdir()
    shutil.copytree(tiny_model_dir, cwd / "base")
    write_jsonl(cwd / "mydata.jsonl", chat_records(8))
    config = conf / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": "no_model_here", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                  "gradient_checkpointing": False},
        "data": {"path": "no_data_here.jsonl", "max_length": 64, "cache": False},
        "train": {"batch_size": 2, "accumulative_counts": 1, "max_steps": 2, "lr": 1e-3, "dtype": "float32"},
        "runtime": {"log_interval": 1, "save_steps": 100}}))
    res = run_cli("train", "../conf/tiny.yaml", "--work-dir", "work", "model.path=base", "data.path=mydata.jsonl",
                  cwd=cwd, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return cwd, "../conf/tiny.yaml"


def test_train_work_dir_and_overrides_are_relative_to_the_current_directory(cwd_and_config):
    cwd, _ = cwd_and_config
    assert (cwd / "work" / "iter_2" / "adapter_model.safetensors").exists()
    run_dir = next(p for p in (cwd / "work").iterdir() if p.is_dir() and not p.name.startswith("iter_"))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["path"] == str(cwd / "mydata.jsonl") and saved["model"]["path"] == str(cwd / "base")


def test_convert_to_hf_writes_its_relative_output_folder_in_the_current_directory(cwd_and_config):
    cwd, config = cwd_and_config
    res = run_cli("convert", "to-hf", config, "work", "adapter", "model.path=base", cwd=cwd, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((cwd / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(cwd / "base")


def test_merge_export_app_and_chat_take_relative_folders(cwd_and_config):
    cwd, config = cwd_and_config
    if not (cwd / "adapter").exists():
        assert run_cli("convert", "to-hf", config, "work", "adapter", "model.path=base", cwd=cwd).returncode == 0
    res = run_cli("convert", "merge", "base", "adapter", "merged", cwd=cwd, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (cwd / "merged" / "config.json").exists() and list((cwd / "merged").glob("*.safetensors"))
    res = run_cli("export-app", "merged", "space", cwd=cwd, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (cwd / "space" / "app.py").exists() and (cwd / "space" / "model" / "config.json").exists()
    res = run_cli("chat", "merged", "--json", "--max-new-tokens", "4", input="hello\n", cwd=cwd, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.splitlines()[0])["question"] == "hello"
