"""A renderer as a Jinja chat template, so a saved tokenizer renders exactly the string tunelab trained on.

transformers' `apply_chat_template`, vLLM and anything else that reads `chat_template.jinja` then build the
same prompt as `Renderer.render`: the same BOS/EOS strings, system text (the run's default one included), round
numbers, suffixes and separators. XTuner templates put the assistant's header inside the user turn, so the
rendered text does not depend on `add_generation_prompt`.

The template is written without any text between its tags, so Jinja's trim/strip options (transformers turns
them on) cannot change a single character; every string is a Jinja literal, so no text in a template string or
system prompt is read as Jinja.
"""

from __future__ import annotations

import json
from string import Formatter

from tunelab.data.templates import HFTemplate, PromptTemplate, Renderer, XTunerTemplate
from tunelab.errors import DataError


def chat_template_for(renderer: Renderer) -> str:
    """The Jinja chat template that renders what `renderer` renders (its default system prompt included)."""
    if isinstance(renderer, XTunerTemplate):
        return xtuner_jinja(renderer.t, renderer.bos, renderer.eos, renderer.system)
    if isinstance(renderer, HFTemplate):
        own = renderer.tokenizer.chat_template
        if isinstance(own, dict):  # several named templates: the one apply_chat_template picks by default
            own = own.get("default") or next(iter(own.values()))
        return with_default_system(own, renderer.system)
    raise DataError(f"prompt template '{renderer.name}' cannot be written as a chat template")


def lit(text: str) -> str:
    """`text` as a Jinja string literal (Jinja reads the same backslash escapes JSON writes)."""
    return json.dumps(text, ensure_ascii=False)


def _expr(fmt: str, fields: dict[str, str]) -> str:
    """An XTuner format string ("[INST] {input} [/INST]") as a Jinja expression joining literals and fields."""
    parts = []
    for literal, field, spec, conversion in Formatter().parse(fmt):
        if literal:
            parts.append(lit(literal))
        if field is not None:
            if field not in fields or spec or conversion:
                raise DataError(f"template string {fmt!r}: unknown field {{{field}}}")
            parts.append(fields[field])
    return " ~ ".join(parts) or '""'


def xtuner_jinja(t: PromptTemplate, bos: str, eos: str, system: str | None) -> str:
    """XTunerTemplate.render's rules in Jinja: BOS before a turn unless the previous reply ended with the
    template's own end-of-turn suffix; the system text in the first turn; reply + SUFFIX, EOS unless
    SUFFIX_AS_EOS, then SEP after every reply."""
    system_expr = _expr(t.system, {"system": "sys", "round": "ns.round"})
    user_expr = _expr(t.instruction, {"input": "m['content']", "round": "ns.round"})
    if t.suffix_as_eos:
        after_reply = "{% set ns.bos = false %}"
    else:
        after_reply = ("{{ " + lit(eos) + " }}" if eos else "") + "{% set ns.bos = true %}"
    if t.sep:
        after_reply += "{{ " + lit(t.sep) + " }}"
    return (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set sys = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set sys = " + (lit(system) if system else "''") + " %}{% set turns = messages %}{% endif %}"
        "{% set ns = namespace(bos=true, round=0) %}"
        "{% for m in turns %}"
        "{% if m['role'] == 'user' %}"
        "{% set ns.round = ns.round + 1 %}"
        + ("{% if ns.bos %}{{ " + lit(bos) + " }}{% endif %}" if bos else "")
        + "{% if ns.round == 1 and sys %}{{ " + system_expr + " }}{% endif %}"
        "{{ " + user_expr + " }}"
        "{% elif m['role'] == 'assistant' %}"
        "{{ m['content'] ~ " + lit(t.suffix) + " }}" + after_reply
        + "{% else %}{{ raise_exception('only the first message may be a system message; then user and "
        "assistant turns') }}{% endif %}"
        "{% endfor %}"
    )


def with_default_system(template: str, system: str | None) -> str:
    """A tokenizer's own template that gives `system` to conversations without a system message, as training
    did (so a default of the template's own never shows). Applied twice, it changes nothing the second time."""
    if not system:
        return template
    prefix = ("{% if not messages or messages[0]['role'] != 'system' %}"
              "{% set messages = [{'role': 'system', 'content': " + lit(system) + "}] + messages %}{% endif %}")
    return template if template.startswith(prefix) else prefix + template
