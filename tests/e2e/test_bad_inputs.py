"""The bad-input matrix (mirrored in docs/bad_inputs.md): each case runs the real CLI and must stop with a
short message naming the thing at fault, exit non-zero, print no traceback, and leave earlier files intact."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import ROOT, chat_records, run_cli, tiny_config, write_jsonl


@dataclass
class Case:
    id: str
    area: str
    what: str
    make: Callable[[Path, Path], list[str]]  # (tmp, tiny model) -> CLI args
    expect: str  # regex the error line must match
    code: int = 1


def cfg(tmp: Path, model: Path, records=None, raw_lines=None, **sections) -> str:
    data = tmp / "data.jsonl"
    write_jsonl(data, raw_lines if raw_lines is not None else (records or chat_records(8)))
    return str(tiny_config(tmp, model, data, **sections))


def yaml_text(tmp: Path, model: Path, text_edit: Callable[[str], str]) -> str:
    p = Path(cfg(tmp, model))
    p.write_text(text_edit(p.read_text()))
    return str(p)


def no_weights(tmp: Path, model: Path) -> list[str]:
    d = tmp / "empty_model"
    d.mkdir()
    (d / "config.json").write_text((model / "config.json").read_text())
    return ["train", cfg(tmp, d)]


def edited_copy(model: Path, dest: Path, **config_changes) -> Path:
    shutil.copytree(model, dest)
    meta = json.loads((dest / "config.json").read_text())
    meta.update(config_changes)
    (dest / "config.json").write_text(json.dumps(meta))
    return dest


def unknown_arch(tmp: Path, model: Path) -> list[str]:
    return ["chat", str(edited_copy(model, tmp / "odd_model", model_type="not_a_real_arch"))]


def remote_code(tmp: Path, model: Path) -> list[str]:
    d = edited_copy(model, tmp / "remote_model", model_type="internlm2_like",
                    auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    return ["chat", str(d)]


def foreign_adapter(tmp: Path, model: Path) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, num_hidden_layers=2, vocab_size=400))
    get_peft_model(wide, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(str(tmp / "adapter"))
    return ["convert", "merge", str(model), str(tmp / "adapter"), str(tmp / "merged")]


def existing_output(tmp: Path, model: Path) -> list[str]:
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(str(model)),
                   LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp / "adapter"))
    return ["convert", "merge", str(model), str(tmp / "adapter"), str(out)]


def pinned_format(tmp: Path, model: Path) -> list[str]:
    """A built-in config (format: openai) given a file of XTuner conversation records, by a relative path."""
    write_jsonl(tmp / "conv.jsonl", [{"conversation": [{"input": "Who are you?", "output": "Ada's assistant."}]}])
    return ["train", "smollm2_135m_instruct_lora_self_cognition_e3", "data.path=conv.jsonl", f"model.path={model}"]


def pinned_entry_format(tmp: Path, model: Path) -> list[str]:
    write_jsonl(tmp / "alpaca.jsonl", [{"instruction": "Add 2 and 2.", "input": "", "output": "4"}])
    return ["train", cfg(tmp, model, data={"path": None, "datasets": [{"path": str(tmp / "alpaca.jsonl"),
                                                                       "format": "openai"}]})]


CASES = [
    Case("config-typo", "config", "misspelt key", lambda t, m: ["train", yaml_text(t, m, lambda s: s.replace(
        "max_length", "max_lenght"))], r"unknown key 'data\.max_lenght'; did you mean 'data\.max_length'"),
    Case("config-type", "config", "wrongly typed value", lambda t, m: ["train", cfg(t, m), "train.lr=fast"],
         r"train\.lr: .*got 'fast'"),
    Case("config-yaml", "config", "not YAML", lambda t, m: ["train", yaml_text(t, m, lambda s: s + "\n  bad: [\n")],
         r"tiny\.yaml:\d+: not valid YAML"),
    Case("config-missing", "config", "config file that does not exist",
         lambda t, m: ["train", str(t / "nope.yaml")], r"config file not found: .*nope\.yaml"),
    Case("config-builtin-typo", "config", "misspelt built-in config name",
         lambda t, m: ["train", "internlm2_chat_1_8b_qlora_alpaca_e4"],
         r"did you mean the built-in config 'internlm2_chat_1_8b_qlora_alpaca_e3'"),
    Case("negative-lr", "config", "negative learning rate", lambda t, m: ["train", cfg(t, m), "train.lr=-1"],
         r"train\.lr: Input should be greater than 0"),
    Case("max-length-0", "config", "max_length 0", lambda t, m: ["train", cfg(t, m), "data.max_length=0"],
         r"data\.max_length: Input should be greater than 0"),
    Case("batch-0", "config", "batch size 0", lambda t, m: ["train", cfg(t, m), "train.batch_size=0"],
         r"train\.batch_size: Input should be greater than 0"),
    Case("lora-r-0", "config", "LoRA rank 0", lambda t, m: ["train", cfg(t, m), "model.lora.r=0"],
         r"model\.lora\.r: Input should be greater than 0"),
    Case("data-missing", "data", "data file that does not exist",
         lambda t, m: ["train", cfg(t, m), f"data.path={t / 'missing.jsonl'}"], r"data file not found: .*missing"),
    Case("data-malformed", "data", "malformed JSON on line 3",
         lambda t, m: ["train", cfg(t, m, raw_lines=[*chat_records(2), '{"messages": [', *chat_records(2)])],
         r"data\.jsonl:3: malformed JSON"),
    Case("data-schema", "data", "record without messages",
         lambda t, m: ["train", cfg(t, m, raw_lines=[*chat_records(1), {"msgs": []}]), "data.format=openai"],
         r"data\.jsonl:2: missing 'messages'"),
    Case("data-format-pinned", "data", "a built-in config's pinned format, a file of another format",
         pinned_format, r"conv\.jsonl:1: missing 'messages'.*; the record looks like XTuner 'conversation' data, "
                        r"not openai: set data\.format: conversation \(or auto\)$"),
    Case("data-format-entry", "data", "a dataset entry's pinned format, a file of another format",
         pinned_entry_format, r"alpaca\.jsonl:1: .*the record looks like alpaca 'instruction'/'output' data, "
                              r"not openai: set data\.datasets\.0\.format: alpaca \(or auto\)$"),
    Case("data-role", "data", "unknown role",
         lambda t, m: ["train", cfg(t, m, raw_lines=[{"messages": [{"role": "wizard", "content": "x"}]}])],
         r"data\.jsonl:1: message 0: unknown role 'wizard'"),
    Case("data-empty", "data", "empty dataset", lambda t, m: ["train", cfg(t, m, raw_lines=[""])],
         r"no training samples"),
    Case("data-template", "data", "unknown prompt template",
         lambda t, m: ["train", cfg(t, m), "data.prompt_template=internlm3_chat"],
         r"unknown prompt template 'internlm3_chat'; did you mean"),
    Case("model-missing", "model", "model folder that does not exist",
         lambda t, m: ["train", cfg(t, t / "no_such_model")], r"model folder not found: .*no_such_model"),
    Case("model-no-weights", "model", "model folder without weights", no_weights,
         r"has a config\.json but no weights"),
    Case("model-arch", "model", "unknown model architecture", unknown_arch,
         r"model type 'not_a_real_arch' .* not known to transformers"),
    Case("model-remote-code", "model", "repo that needs trust_remote_code", remote_code,
         r"ships its own model code; pass --trust-remote-code"),
    Case("adapter-other-base", "model", "adapter of another base model (shape mismatch)", foreign_adapter,
         r"adapter .* does not fit base model .*size mismatch"),
    Case("adapter-missing", "model", "an adapter folder that does not exist",
         lambda t, m: ["chat", str(m), "--adapter", str(t / "no_adapter")], r"adapter folder not found: .*no_adapter$"),
    Case("output-exists", "output", "merge into an existing non-empty folder", existing_output,
         r"output folder .*out already exists and is not empty"),
    Case("resume-nothing", "checkpoint", "--resume with no checkpoint",
         lambda t, m: ["train", cfg(t, m), "--work-dir", str(t / "w"), "--resume"], r"no complete checkpoint"),
    Case("strategy-unknown", "cli", "unknown --deepspeed strategy",
         lambda t, m: ["train", cfg(t, m), "--deepspeed", "deepspeed_zero4"],
         r"--deepspeed: unknown strategy 'deepspeed_zero4'; valid: ddp, zero1, zero2, zero2_offload, zero3, "
         r"zero3_offload"),
    Case("chat-missing", "cli", "chat with a model that does not exist",
         lambda t, m: ["chat", str(t / "ghost")], r"model folder not found"),
    Case("cli-unknown", "cli", "unknown command", lambda t, m: ["trian"], r"invalid choice: 'trian'", code=2),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly(case: Case, tmp_path: Path, tiny_model_dir: Path):
    args = case.make(tmp_path, tiny_model_dir)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    res = run_cli(*args, cwd=tmp_path, timeout=300)
    assert res.returncode == case.code, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:") or "error:" in ln[:20]]
    assert errors, res.stderr[-2000:]
    assert re.search(case.expect, res.stderr), res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) <= 4, res.stderr  # a short message, not a wall of text
    for p, content in before.items():  # nothing previously written is lost or changed
        assert p.exists() and p.read_bytes() == content, p


def _oserror_enospc() -> Exception:
    import errno

    return OSError(errno.ENOSPC, "No space left on device")


def _safetensors_enospc() -> Exception:
    from safetensors import SafetensorError

    # what safetensors' Rust writer raises when the disk is full (not an OSError)
    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("disk_full", [_oserror_enospc, _safetensors_enospc], ids=["oserror", "safetensors"])
def test_disk_full_during_checkpoint_keeps_the_previous_one(tmp_path, tiny_model_dir, monkeypatch, disk_full):
    import tunelab.train.checkpoint as ck
    from tunelab.config.load import load_config
    from tunelab.errors import TrainingError
    from tunelab.train.loop import train

    data = write_jsonl(tmp_path / "data.jsonl", chat_records(12))
    config = load_config(tiny_config(tmp_path, tiny_model_dir, data),
                         ["runtime.save_steps=1", "train.max_steps=3", "data.pack_to_max_length=false"])
    real = ck.save_file
    calls = {"n": 0}

    def flaky(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (optimizer + rng files) saves; the second hits a full disk
            raise disk_full()
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", flaky)
    with pytest.raises(TrainingError, match=r"could not save checkpoint .*iter_2: No space left on device; "
                                            r"the previous checkpoint .*iter_1 is intact"):
        train(config, "tiny", work_dir=tmp_path / "w")
    work = tmp_path / "w"
    assert (work / "last_checkpoint").read_text().strip() == "iter_1"
    assert (work / "iter_1" / "trainer_state.json").exists()
    assert not (work / "iter_2").exists() and not list(work.glob(".iter_*"))


def test_docs_table_lists_every_case():
    doc = (ROOT / "docs" / "bad_inputs.md").read_text()
    for case in CASES:
        assert f"`{case.id}`" in doc, case.id
    assert "`disk-full`" in doc
    assert len(CASES) + 1 >= 20
