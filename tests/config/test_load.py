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


def test_dora_with_torchao_nf4_is_refused_and_auto_is_the_default(tmp_path):
    cfg = write(tmp_path, BASE.format(model="m"))
    assert load_config(cfg, ["model.quantization=nf4"]).model.nf4_format == "auto"
    with pytest.raises(ConfigError, match=r"nf4_format=torchao with lora\.use_dora: peft's DoRA cannot "
                                          r"de-quantize torchao's NF4 weights; use nf4_format auto or bitsandbytes"):
        load_config(cfg, ["model.quantization=nf4", "model.nf4_format=torchao", "model.lora.use_dora=true"])
    with pytest.raises(ConfigError, match=r"model\.nf4_format"):
        load_config(cfg, ["model.nf4_format=gptq"])


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


# ---- where relative paths point: the config file's folder for paths written in it, the current directory for
# ---- paths given on the command line (overrides) and for a built-in config (it has no folder)


@pytest.fixture()
def two_folders(tmp_path):
    """A config in conf/ naming data.jsonl and model/ (both there), and a different current directory run/
    that has its own data.jsonl and model/."""
    conf, run = tmp_path / "conf", tmp_path / "run"
    for d in (conf, run):
        (d / "model").mkdir(parents=True)
        (d / "data.jsonl").write_text('{"messages": []}\n')
    (conf / "cfg.yaml").write_text(BASE.format(model="model"))
    return conf, run


def test_paths_written_in_a_config_file_resolve_against_its_folder(two_folders):
    conf, run = two_folders
    cfg = load_config(conf / "cfg.yaml", cwd=run)
    assert (cfg.data.path, cfg.model.path) == (str(conf / "data.jsonl"), str(conf / "model"))


def test_a_data_path_override_resolves_against_the_current_directory(two_folders):
    conf, run = two_folders
    cfg = load_config(conf / "cfg.yaml", ["data.path=data.jsonl"], cwd=run)
    assert cfg.data.path == str(run / "data.jsonl")
    assert cfg.model.path == str(conf / "model")  # untouched by the override: still the config's folder
    cfg = load_config(conf / "cfg.yaml", ["data.path=sub/new.jsonl"], cwd=run)  # not there yet: still the cwd
    assert cfg.data.path == str(run / "sub" / "new.jsonl")


def test_a_model_path_override_resolves_against_the_current_directory(two_folders):
    conf, run = two_folders
    cfg = load_config(conf / "cfg.yaml", ["model.path=model"], cwd=run)
    assert cfg.model.path == str(run / "model")
    assert load_config(conf / "cfg.yaml", ["model.path=smollm2-135m-instruct"], cwd=run).model.path == \
        "smollm2-135m-instruct"  # the alias is not a path


def test_dataset_entry_paths_follow_the_same_rule(two_folders):
    conf, run = two_folders
    text = BASE.format(model="model").replace("  path: data.jsonl\n", "  datasets:\n    - path: data.jsonl\n"
                                                                      "    - path: data.jsonl\n")
    (conf / "cfg.yaml").write_text(text)
    cfg = load_config(conf / "cfg.yaml", ["data.datasets.1.path=data.jsonl"], cwd=run)
    assert [d.path for d in cfg.data.datasets] == [str(conf / "data.jsonl"), str(run / "data.jsonl")]
    cfg = load_config(conf / "cfg.yaml", ["data.datasets=[{path: data.jsonl}]"], cwd=run)
    assert [d.path for d in cfg.data.datasets] == [str(run / "data.jsonl")]


def test_a_built_in_config_and_its_overrides_resolve_against_the_current_directory(tmp_path):
    """The demo's bug: its data file, given relative to the current directory, was resolved against the work
    folder a second time (work/work/data/...)."""
    work = "work_dirs/tunelab_demo/20250101_000000"
    cfg = load_config("smollm2_135m_instruct_lora_self_cognition_e3", [f"data.path={work}/data/sc.jsonl"],
                      cwd=tmp_path)
    assert cfg.data.path == str(tmp_path / work / "data" / "sc.jsonl")
    cfg = load_config("smollm2_135m_instruct_lora_self_cognition_e3", cwd=tmp_path)
    assert cfg.data.path == str(tmp_path / "data" / "self_cognition.jsonl")  # the built-in's own relative path
    with pytest.raises(ConfigError, match="did you mean the built-in config "
                                          "'smollm2_135m_instruct_lora_self_cognition_e3'"):
        load_config("smollm2_135m_instruct_lora_self_cognition_e4", cwd=tmp_path)


def test_cuda_graphs_with_offloaded_checkpointing_are_refused_and_with_accumulation_accepted(tmp_path):
    with pytest.raises(ConfigError, match="model.compile: cudagraphs cannot replay layers checkpointed to CPU "
                                          "memory") as e:
        load_config(write(tmp_path, BASE.format(model="m")),
                    ["model.compile=cudagraphs", "model.gradient_checkpointing=offload"])
    assert "model.gradient_checkpointing: true (inside the compiled layers)" in str(e.value)
    ok = load_config(write(tmp_path, BASE.format(model="m")), ["model.compile=cudagraphs", "train.accumulative_counts=16"])
    assert (ok.model.compile, ok.train.accumulative_counts) == ("cudagraphs", 16)
    ok = load_config(write(tmp_path, BASE.format(model="m")),  # checkpointed inside the compiled layers
                     ["model.compile=cudagraphs", "model.gradient_checkpointing=true"])
    assert (ok.model.compile, ok.model.gradient_checkpointing) == ("cudagraphs", True)


def test_a_typo_in_a_command_line_override_is_blamed_on_the_command_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE.format(model="m")), ["data.max_lenght=1024"])
    assert str(e.value).startswith("command line 'data.max_lenght=1024': unknown key 'data.max_lenght'")
    assert "did you mean 'data.max_length'" in str(e.value)
    with pytest.raises(ConfigError, match=r"^command line 'train\.lr=-1': train\.lr"):
        load_config(write(tmp_path, BASE.format(model="m")), ["train.lr=-1"])
