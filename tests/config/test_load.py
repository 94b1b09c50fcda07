"""Config loading: validation messages name the key (and line), suggest fixes, and overrides work."""

from pathlib import Path

import pytest

from tunelab.config.load import apply_override, load_config
from tunelab.errors import ConfigError

BASE = """\
model:
  path: {model}
  lora:
    r: 8
data:
  path: data.jsonl
  max_length: 128
train:
  lr: 0.001
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "data.jsonl").write_text('{"messages": []}\n')
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_valid_config_resolves_relative_paths_against_the_config_folder(tmp_path):
    cfg = load_config(write(tmp_path, BASE.format(model="smollm2-135m-instruct")))
    assert cfg.data.path == str((tmp_path / "data.jsonl").resolve())
    assert cfg.model.path == "smollm2-135m-instruct"  # the alias is kept
    assert cfg.model.trust_remote_code is False
    assert cfg.model.lora.r == 8 and cfg.train.lr == 0.001


def test_misspelt_key_is_named_with_line_and_suggestion(tmp_path):
    p = write(tmp_path, BASE.format(model="m").replace("max_length", "max_lenght"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "unknown key 'data.max_lenght'" in msg
    assert "did you mean 'data.max_length'" in msg
    assert f"{p}:7" in msg


def test_misspelt_section_is_suggested(tmp_path):
    p = write(tmp_path, BASE.format(model="m").replace("train:", "trian:"))
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean 'train'"):
        load_config(p)


def test_wrong_type_names_key_and_value(tmp_path):
    p = write(tmp_path, BASE.format(model="m").replace("lr: 0.001", "lr: fast"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.lr" in str(e.value) and "'fast'" in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("train.lr=-1", "train.lr"), ("data.max_length=0", "data.max_length"), ("train.batch_size=0", "train.batch_size"),
    ("model.lora.r=0", "model.lora.r"), ("train.warmup_ratio=1.5", "train.warmup_ratio"),
    ("runtime.save_total_limit=0", "runtime.save_total_limit"), ("model.quantization=nf5", "model.quantization"),
])
def test_impossible_values_are_refused(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, BASE.format(model="m")), [override])


def test_overrides_set_nested_keys_and_parse_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, BASE.format(model="m")),
                      ["data.max_length=512", "model.lora=null", "runtime.evaluation_inputs=[a, b]",
                       "train.betas=[0.8, 0.9]"])
    assert cfg.data.max_length == 512
    assert cfg.model.lora is None
    assert cfg.runtime.evaluation_inputs == ["a", "b"]
    assert cfg.train.betas == (0.8, 0.9)


def test_unknown_override_key_is_suggested(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'data\.max_lenth'; did you mean 'data\.max_length'"):
        load_config(write(tmp_path, BASE.format(model="m")), ["data.max_lenth=5"])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        apply_override({}, "data.max_length")


def test_invalid_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "model:\n  path: [unclosed\ndata:\n  path: x\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:\d+: not valid YAML"):
        load_config(p)


def test_yaml_is_parsed_safely(tmp_path):
    p = write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\ndata:\n  path: x\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_environment_variables_are_not_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_DIR", "/etc")
    cfg = load_config(write(tmp_path, BASE.format(model="m").replace("data.jsonl", "$SECRET_DIR/passwd")))
    assert cfg.data.path == str((tmp_path / "$SECRET_DIR/passwd").resolve())


def test_missing_data_section_and_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  path: m\n")
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_qlora_without_lora_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="QLoRA"):
        load_config(write(tmp_path, BASE.format(model="m")), ["model.quantization=nf4", "model.lora=null"])


def test_dataset_entries_take_unset_options_from_the_data_section(tmp_path):
    text = BASE.format(model="m").replace("  path: data.jsonl\n", """\
  format: alpaca
  split: validation
  max_samples: 5
  datasets:
    - path: data.jsonl
    - path: data.jsonl
      format: openai
      split: train
      max_samples: 2
""")
    specs = load_config(write(tmp_path, text)).data.specs()
    assert [(s.format, s.split, s.max_samples) for s in specs] == [("alpaca", "validation", 5), ("openai", "train", 2)]


def test_overrides_index_into_lists(tmp_path):
    text = BASE.format(model="m").replace("  path: data.jsonl\n", "  datasets:\n    - path: data.jsonl\n"
                                                                  "    - path: data.jsonl\n")
    p = write(tmp_path, text)
    cfg = load_config(p, ["data.datasets.1.weight=3", "data.datasets.0.format=alpaca"])
    assert [(d.weight, d.format) for d in cfg.data.datasets] == [(1.0, "alpaca"), (3.0, None)]
    with pytest.raises(ConfigError, match=r"override 'data\.datasets\.2\.weight=3': 'data\.datasets' has 2 item"):
        load_config(p, ["data.datasets.2.weight=3"])
    with pytest.raises(ConfigError, match=r"'data\.datasets' is a list; address an item by its index "
                                          r"\(data\.datasets\.0\.weight\)"):
        load_config(p, ["data.datasets.weight=3"])
    raw = {"data": {"path": ["a", "b"]}}
    apply_override(raw, "data.path.1=c")
    assert raw == {"data": {"path": ["a", "c"]}}
