"""Safe defaults: no pickles loaded, no remote code unless asked, servers on loopback, nothing written as
pickle in a checkpoint."""

import re
from pathlib import Path

from tests.conftest import ROOT
from tunelab.cli import build_parser
from tunelab.config.catalog import CATALOG, build_config
from tunelab.config.schema import ModelSettings


def test_no_torch_load_without_weights_only():
    for f in (ROOT / "tunelab").rglob("*.py"):
        for m in re.finditer(r"torch\.load\((.*)", f.read_text()):
            assert "weights_only=True" in m.group(1), f"{f}: {m.group(0)}"


def test_no_pickle_anywhere_in_the_package():
    for f in (ROOT / "tunelab").rglob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, f


def test_trust_remote_code_is_off_by_default_everywhere():
    assert ModelSettings().trust_remote_code is False
    assert all(build_config(name)["model"]["trust_remote_code"] is False for name in CATALOG)
    parser = build_parser()
    for argv in (["chat", "m"], ["web", "m"], ["serve", "m"], ["convert", "merge", "a", "b", "c"],
                 ["eval", "self-cognition", "m", "--name", "x"]):
        assert parser.parse_args(argv).trust_remote_code is False, argv


def test_servers_bind_to_loopback_by_default():
    parser = build_parser()
    assert parser.parse_args(["web", "m"]).host == "127.0.0.1"
    assert parser.parse_args(["serve", "m"]).host == "127.0.0.1"


def test_checkpoints_hold_only_safetensors_and_json(tmp_path, tiny_model_dir):
    from tests.conftest import chat_records, tiny_config, write_jsonl
    from tunelab.config.load import load_config
    from tunelab.train.loop import train

    data = write_jsonl(tmp_path / "d.jsonl", chat_records(4))
    res = train(load_config(tiny_config(tmp_path, tiny_model_dir, data), ["train.max_steps=1"]), "t",
                work_dir=tmp_path / "w")
    suffixes = {p.suffix for p in Path(res.checkpoint).iterdir()}
    assert suffixes <= {".safetensors", ".json", ".yaml", ".md"}, suffixes
