"""Prompt templates render XTuner's exact strings; the hf template follows the tokenizer's chat template;
only assistant replies (and their end-of-turn token) are trained on."""

import pytest

from tunelab.data.encode import encode_samples, shifted_labels
from tunelab.data.formats import Conversation, Message
from tunelab.data.templates import TEMPLATES, get_template
from tunelab.errors import DataError

CONV = Conversation([Message("system", "S"), Message("user", "q1"), Message("assistant", "a1"),
                     Message("user", "q2"), Message("assistant", "a2")])


def test_internlm2_chat_renders_xtuner_strings(tiny_tokenizer):
    segs = get_template("internlm2_chat", tiny_tokenizer).render(CONV)
    assert segs == [
        ("<s><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n", False),
        ("a1<|im_end|>", True), ("\n", False),
        ("<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n", False),
        ("a2<|im_end|>", True), ("\n", False)]


def test_default_template_adds_bos_and_eos_per_turn(tiny_tokenizer):
    segs = get_template("default", tiny_tokenizer).render(CONV)
    assert segs == [("<s><|System|>:S\n<|User|>:q1\n<|Bot|>:", False), ("a1", True), ("<|im_end|>", True),
                    ("\n", False), ("<s><|User|>:q2\n<|Bot|>:", False), ("a2", True), ("<|im_end|>", True),
                    ("\n", False)]


def test_llama3_and_chatglm2_round_numbers(tiny_tokenizer):
    segs = get_template("llama3_chat", tiny_tokenizer).render(CONV)
    assert segs[0][0] == ("<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                          "<|start_header_id|>user<|end_header_id|>\n\nq1<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert segs[1] == ("a1<|eot_id|>", True)
    segs = get_template("chatglm2", tiny_tokenizer).render(CONV)
    assert "[Round 2]\n\n问：q2\n\n答：" in segs[4][0]


def test_generation_prompt_matches_training_prefix(tiny_tokenizer):
    for name in ("internlm2_chat", "qwen_chat", "hf"):
        t = get_template(name, tiny_tokenizer)
        prompt = Conversation(CONV.messages[:4])
        gen = "".join(s for s, _ in t.render(prompt, add_generation_prompt=True))
        train = "".join(s for s, _ in t.render(CONV))
        assert train.startswith(gen), name
        assert train[len(gen):].startswith("a2")


def test_hf_template_segments_follow_the_chat_template(tiny_tokenizer):
    segs = get_template("hf", tiny_tokenizer).render(CONV)
    text = "".join(s for s, _ in segs)
    assert text == tiny_tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in CONV.messages], tokenize=False)
    assert [s for s, loss in segs if loss] == ["a1<|im_end|>", "a2<|im_end|>"]
    assert ("\n", False) in segs  # the newline after <|im_end|> is not trained on


def test_only_assistant_tokens_are_targets(tiny_tokenizer):
    for name in ("internlm2_chat", "hf", "default"):
        t = get_template(name, tiny_tokenizer)
        conv = Conversation(CONV.messages[1:])
        enc = encode_samples([conv], [t.render(conv)], tiny_tokenizer)[0]
        trained = tiny_tokenizer.decode(enc.input_ids[enc.loss_mask].tolist())
        assert trained == "a1<|im_end|>a2<|im_end|>", name
        labels = shifted_labels(enc)
        # labels[t] is the next token when it is a target, else -100
        for i in range(len(labels) - 1):
            assert labels[i] == (enc.input_ids[i + 1] if enc.loss_mask[i + 1] else -100)
        assert labels[-1] == -100


def test_message_with_loss_false_is_not_trained(tiny_tokenizer):
    conv = Conversation([Message("user", "q1"), Message("assistant", "a1", loss=False), Message("user", "q2"),
                         Message("assistant", "a2")])
    t = get_template("internlm2_chat", tiny_tokenizer)
    enc = encode_samples([conv], [t.render(conv)], tiny_tokenizer)[0]
    assert tiny_tokenizer.decode(enc.input_ids[enc.loss_mask].tolist()) == "a2<|im_end|>"


def test_unknown_template_suggests_the_closest(tiny_tokenizer):
    with pytest.raises(DataError, match="unknown prompt template 'internlm2_caht'; did you mean 'internlm2_chat'"):
        get_template("internlm2_caht", tiny_tokenizer)


# XTuner 0.1.23's PROMPT_TEMPLATE names, as it spells them (xtuner/utils/templates.py at tag v0.1.23)
XTUNER_0_1_23 = ("default", "zephyr", "internlm_chat", "internlm2_chat", "moss_sft", "llama2_chat",
                 "code_llama_chat", "chatglm2", "chatglm3", "qwen_chat", "baichuan_chat", "baichuan2_chat",
                 "wizardlm", "wizardcoder", "vicuna", "deepseek_coder", "deepseekcoder", "deepseek_moe",
                 "deepseek_v2", "mistral", "mixtral", "minicpm", "gemma", "cohere_chat", "llama3_chat", "phi3_chat")


def test_every_xtuner_0_1_23_template_name_is_accepted(tiny_tokenizer):
    assert sorted(TEMPLATES) == sorted(XTUNER_0_1_23)
    for name in XTUNER_0_1_23:
        assert get_template(name, tiny_tokenizer).name == name
    assert TEMPLATES["deepseekcoder"] == TEMPLATES["deepseek_coder"]  # two spellings of one template


def test_a_default_system_prompt_fills_in_only_where_none_is_given(tiny_tokenizer):
    t = get_template("internlm2_chat", tiny_tokenizer, system="D")
    without = Conversation(CONV.messages[1:])
    assert t.render(without)[0][0].startswith("<s><|im_start|>system\nD<|im_end|>\n")
    assert t.render(CONV)[0][0].startswith("<s><|im_start|>system\nS<|im_end|>\n")
    hf = get_template("hf", tiny_tokenizer, system="D")
    assert hf.render(without)[0][0].startswith("<|im_start|>system\nD<|im_end|>\n")


def test_a_chat_template_that_raises_refuses_the_record(tiny_tokenizer):
    from jinja2 import TemplateError

    from tunelab.data.formats import RecordError

    tiny_tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}"
                                    "{{ raise_exception('System role not supported') }}{% endif %}"
                                    + tiny_tokenizer.chat_template)
    t = get_template("hf", tiny_tokenizer)
    with pytest.raises(RecordError, match=r"^chat template: System role not supported$") as e:
        t.render(CONV)
    assert not isinstance(e.value, TemplateError)
    assert t.render(Conversation(CONV.messages[1:]))  # without a system message it renders
