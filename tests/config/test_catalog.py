"""Built-in configs: one table, every entry valid, copy-cfg writes YAML that loads back to the same config."""

import pytest

from tunelab.config.catalog import CATALOG, build_config, copy_header, list_configs, render_yaml
from tunelab.config.load import load_config
from tunelab.config.schema import Config


def test_catalog_covers_the_tutorial_models_methods_and_datasets():
    names = set(CATALOG)
    for model in ("smollm2_135m_instruct", "internlm2_chat_1_8b", "internlm2_chat_7b", "qwen2_5_0_5b_instruct",
                  "qwen2_5_1_5b_instruct", "qwen2_5_7b_instruct", "llama3_8b_instruct"):
        for method in ("qlora", "lora", "full"):
            assert f"{model}_{method}_alpaca_e3" in names
            assert f"{model}_{method}_oasst1_e3" in names
            assert f"{model}_{method}_openai_json_e3" in names
            assert f"{model}_{method}_self_cognition_e3" in names
    assert "internlm2_chat_1_8b_qlora_alpaca_e3" in names
    assert "smollm2_135m_instruct_lora_self_cognition_e3" in names
    assert "internlm2_chat_7b_full_custom_pretrain_e1" in names
    assert "internlm2_chat_7b_lora_custom_pretrain_e1" in names


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_builtin_config_validates(name):
    cfg = Config.model_validate(build_config(name))
    assert cfg.model.trust_remote_code is False


def test_list_filters_by_substring_or_glob():
    assert list_configs("internlm2_chat_1_8b_qlora") == sorted(n for n in CATALOG
                                                                if "internlm2_chat_1_8b_qlora" in n)
    assert all(n.endswith("_e1") for n in list_configs("*pretrain*"))
    assert list_configs("no_such_thing") == []


def test_copied_yaml_loads_back_to_the_same_config(tmp_path):
    name = "internlm2_chat_1_8b_qlora_alpaca_e3"
    p = tmp_path / f"{name}_copy.yaml"
    p.write_text(render_yaml(build_config(name), copy_header(name)))
    text = p.read_text()
    assert text.startswith("# tunelab config internlm2_chat_1_8b_qlora_alpaca_e3")
    assert "trust_remote_code: true only if you trust" in text  # the remote-code note, off by default
    loaded = load_config(p)
    expected = Config.model_validate(build_config(name))
    assert loaded.model_dump() == expected.model_dump()
    assert loaded.data.prompt_template == "internlm2_chat"
    assert loaded.model.quantization == "nf4"
