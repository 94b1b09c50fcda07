"""Every prompt template, written as a Jinja chat template into a saved tokenizer and read back from disk, renders
the string tunelab trains on and gives the same token ids: with and without a system prompt (the run's default
one included), one turn and three, training text and generation prompt, and for tokenizers that have no BOS or
that add one by themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import build_tiny_tokenizer
from tunelab.data.chat_template import chat_template_for
from tunelab.data.encode import encode_for_generation, encode_samples
from tunelab.data.formats import Conversation, Message
from tunelab.data.sidecar import save_prompt_files
from tunelab.data.templates import TEMPLATE_NAMES, TEMPLATES, get_template

# A run's data.system with text that must stay text: quotes, braces, Jinja delimiters, a newline, CJK.
RUN_SYSTEM = 'Answer as "Ada" {system} {{ x }} {% if %}\n你好'
# tunelab (like XTuner) tokenises prompt and reply apart; one string can tokenise differently where a piece
# boundary is not a token boundary. deepseek_v2's prompt ends in a space ("Assistant: ") that byte-level BPE
# joins to the reply's first word; with the default model, llama3_chat's and cohere_chat's markers are not
# tokens of its vocabulary, and BPE merges across them ("\n\n", "|><"). Their strings still match exactly.
SPLITS_DIFFER = {"tiny": {"deepseek_v2"}, "smollm2": {"deepseek_v2", "llama3_chat", "cohere_chat"}}


def conversations(system: str | None, turns: int) -> tuple[Conversation, Conversation]:
    """(a finished conversation, the same one waiting for its last reply)."""
    msgs = [Message("system", system)] if system else []
    for i in range(turns):
        msgs += [Message("user", f"Question {i}?"), Message("assistant", f"Answer {i}.")]
    return Conversation(msgs), Conversation(msgs[:-1])


def as_dicts(conv: Conversation) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in conv.messages]


def saved_tokenizer(source: Path, out: Path, template: str, system: str | None):
    """tunelab's renderer, and the tokenizer it exported, reloaded from disk."""
    from transformers import AutoTokenizer

    from tunelab.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(source))
    renderer = get_template(template, tokenizer, system)
    out.mkdir(parents=True)
    save_prompt_files(out, tokenizer, renderer, None)
    return renderer, AutoTokenizer.from_pretrained(str(out))


def check_both_ways(renderer, exported, template: str, ids_must_match: bool) -> int:
    """Compare tunelab's rendering and token ids with the exported tokenizer's for every case; returns the
    number of cases checked."""
    n = 0
    for system in (None, "Be brief."):
        for turns in (1, 3):
            done, waiting = conversations(system, turns)
            case = (template, renderer.system is not None, system, turns)
            text = "".join(s for s, _ in renderer.render(done))
            prompt = "".join(s for s, _ in renderer.render(waiting, add_generation_prompt=True))
            assert exported.apply_chat_template(as_dicts(done), tokenize=False) == text, case
            assert exported.apply_chat_template(as_dicts(waiting), tokenize=False,
                                                add_generation_prompt=True) == prompt, case
            assert text.startswith(prompt), case
            train_ids = encode_samples([done], [renderer.render(done)], exported)[0].input_ids.tolist()
            prompt_ids = encode_for_generation(waiting, renderer, exported)
            got_train = exported.apply_chat_template(as_dicts(done))["input_ids"]
            got_prompt = exported.apply_chat_template(as_dicts(waiting), add_generation_prompt=True)["input_ids"]
            if ids_must_match:
                assert got_train == train_ids, case
                assert got_prompt == prompt_ids, case
            else:  # the same text, cut into tokens differently at a piece boundary
                assert exported.decode(got_train) == exported.decode(train_ids) == text, case
            if turns == 1:  # one piece of prompt: the ids always agree
                assert got_prompt == prompt_ids, case
            n += 1
    return n


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny tokenizer; one that adds BOS by itself (as Llama's do); one without a BOS token (as Qwen's)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tokenizers")
    plain = build_tiny_tokenizer(root / "plain")
    adds = PreTrainedTokenizerFast.from_pretrained(str(root / "plain"))
    bos = adds.convert_tokens_to_ids("<s>")
    adds.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>",
                                                                                                            bos)])
    adds.save_pretrained(str(root / "adds_bos"))
    assert PreTrainedTokenizerFast.from_pretrained(str(root / "adds_bos"))("hi")["input_ids"][0] == bos
    plain.bos_token = None
    plain.save_pretrained(str(root / "no_bos"))
    assert PreTrainedTokenizerFast.from_pretrained(str(root / "no_bos")).bos_token is None
    return {name: root / name for name in ("plain", "adds_bos", "no_bos")}


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
@pytest.mark.parametrize("variant", ["plain", "adds_bos", "no_bos"])
def test_every_template_renders_alike_through_a_saved_tokenizer(tokenizers, tmp_path, template, variant):
    source = tokenizers[variant]
    for run_system in (None, RUN_SYSTEM):
        out = tmp_path / ("with_system" if run_system else "plain")
        renderer, exported = saved_tokenizer(source, out, template, run_system)
        n = check_both_ways(renderer, exported, template, template not in SPLITS_DIFFER["tiny"])
        assert n == 4
        if variant == "no_bos":
            assert "None" not in exported.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False)


def test_the_run_system_prompt_is_the_default_and_an_explicit_one_wins(tokenizers, tmp_path):
    _, exported = saved_tokenizer(tokenizers["plain"], tmp_path / "t", "llama2_chat", RUN_SYSTEM)
    user = [{"role": "user", "content": "Hi"}]
    default = exported.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert default == ("<s>" + TEMPLATES["llama2_chat"].system.format(system=RUN_SYSTEM) + "[INST] Hi [/INST]")
    own = exported.apply_chat_template([{"role": "system", "content": "Mine."}, *user], tokenize=False)
    assert "Mine." in own and "Ada" not in own
    none = exported.apply_chat_template([{"role": "system", "content": ""}, *user], tokenize=False)
    assert none == "<s>[INST] Hi [/INST]"  # an empty system message: no system text, as in training


def test_a_tokenizer_exported_twice_keeps_one_default_system(tokenizers, tmp_path):
    """An exported hf folder exported again (merge, export-app) gets the same template, not a second wrapper."""
    renderer, once = saved_tokenizer(tokenizers["plain"], tmp_path / "once", "hf", RUN_SYSTEM)
    _, twice = saved_tokenizer(tmp_path / "once", tmp_path / "twice", "hf", RUN_SYSTEM)
    assert twice.chat_template == once.chat_template != renderer.tokenizer.chat_template


def test_adds_bos_tokenizer_gets_one_bos(tokenizers, tmp_path):
    _, exported = saved_tokenizer(tokenizers["adds_bos"], tmp_path / "t", "llama2_chat", None)
    ids = exported.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)["input_ids"]
    bos = exported.bos_token_id
    assert ids[0] == bos and ids[1] != bos and ids.count(bos) == 1


def test_the_template_does_not_depend_on_jinja_whitespace_options(tokenizers):
    """transformers renders with trim_blocks/lstrip_blocks; other runtimes may not: the output is the same."""
    from jinja2 import Environment
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizers["plain"]))
    done, _ = conversations("S", 3)
    for name in TEMPLATES:
        renderer = get_template(name, tok, RUN_SYSTEM)
        bare = Environment().from_string(chat_template_for(renderer))
        assert bare.render(messages=as_dicts(done), add_generation_prompt=False) == \
            "".join(s for s, _ in renderer.render(done)), name


def test_a_role_the_template_cannot_place_is_refused(tokenizers, tmp_path):
    from jinja2 import TemplateError

    _, exported = saved_tokenizer(tokenizers["plain"], tmp_path / "t", "qwen_chat", None)
    with pytest.raises(TemplateError, match="only the first message may be a system message"):
        exported.apply_chat_template([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}],
                                     tokenize=False)


def test_every_template_with_the_default_model_tokenizer(default_model_dir, tmp_path):
    for template in TEMPLATE_NAMES:
        renderer, exported = saved_tokenizer(default_model_dir, tmp_path / template, template, RUN_SYSTEM)
        check_both_ways(renderer, exported, template, template not in SPLITS_DIFFER["smollm2"])
