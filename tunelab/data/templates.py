"""Prompt templates: a conversation -> text segments, each marked as trained on (loss) or not.

Two kinds, one interface (`render`):
- `XTunerTemplate`: XTuner 0.1.x's templates under their names, rendering the same strings
  (BOS, SYSTEM, INSTRUCTION, output + SUFFIX, EOS unless SUFFIX_AS_EOS, SEP after every turn).
- `HFTemplate` ("hf"): the tokenizer's own Jinja chat template; assistant spans are found by rendering the
  conversation up to each assistant turn, so the same template serves training and chat.

Training and chat both call `render`, so a fine-tuned model sees at chat time exactly what it saw in training.
A renderer made with a default system prompt (the run's `data.system`, at chat time) gives it to every
conversation that has no system message, as training did. `data/chat_template.py` writes the same rules as a
Jinja chat template, so an exported tokenizer renders the same string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tunelab.data.formats import Conversation, Message, RecordError
from tunelab.errors import DataError

Segments = list[tuple[str, bool]]


@dataclass(frozen=True)
class PromptTemplate:
    system: str = "{system}\n"
    instruction: str = "{input}"
    suffix: str = ""
    suffix_as_eos: bool = False
    sep: str = ""
    stop_words: tuple[str, ...] = ()


_LLAMA2_SYS = ("[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. Always answer as helpfully "
               "as possible, while being safe. Your answers should not include any harmful, unethical, racist, "
               "sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially "
               "unbiased and positive in nature.\n{system}\n<</SYS>>\n [/INST] ")
_VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions. {system}\n ")
_DEEPSEEK_CODER_SYS = ("You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by "
                       "DeepSeekCompany, and you only answer questions related to computer science. For "
                       "politically sensitive questions, security and privacy issues, and other non-computer "
                       "science questions, you will refuse to answer. {system}\n")
_CHATML_SYS = "<|im_start|>system\n{system}<|im_end|>\n"
_CHATML_INST = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"

# XTuner 0.1.x's PROMPT_TEMPLATE table (the strings, not its code).
TEMPLATES: dict[str, PromptTemplate] = {
    "default": PromptTemplate("<|System|>:{system}\n", "<|User|>:{input}\n<|Bot|>:", sep="\n"),
    "zephyr": PromptTemplate("<|system|>\n{system}\n", "<|user|>\n{input}\n<|assistant|>\n", sep="\n"),
    "internlm_chat": PromptTemplate("<|System|>:{system}\n", "<|User|>:{input}<eoh>\n<|Bot|>:", "<eoa>", True,
                                    "\n", ("<eoa>",)),
    "internlm2_chat": PromptTemplate(_CHATML_SYS, _CHATML_INST, "<|im_end|>", True, "\n", ("<|im_end|>",)),
    "moss_sft": PromptTemplate("{system}\n", "<|Human|>: {input}<eoh>\n", sep="\n", stop_words=("<eoc>", "<eom>")),
    "llama2_chat": PromptTemplate(_LLAMA2_SYS, "[INST] {input} [/INST]", sep="\n"),
    "code_llama_chat": PromptTemplate("{system}\n", "[INST] {input} [/INST]"),
    "chatglm2": PromptTemplate("{system}\n", "[Round {round}]\n\n问：{input}\n\n答：", sep="\n\n"),
    "chatglm3": PromptTemplate("<|system|>\n{system}", "<|user|>\n{input}<|assistant|>\n", sep="\n"),
    "qwen_chat": PromptTemplate(_CHATML_SYS, _CHATML_INST, "<|im_end|>", True, "\n",
                                ("<|im_end|>", "<|endoftext|>")),
    "baichuan_chat": PromptTemplate("{system}\n", "<reserved_102>{input}<reserved_103>", sep="\n"),
    "baichuan2_chat": PromptTemplate("{system}\n", "<reserved_106>{input}<reserved_107>", sep="\n"),
    "wizardlm": PromptTemplate(_VICUNA_SYS, "USER: {input} ASSISTANT:", sep="\n"),
    "wizardcoder": PromptTemplate("Below is an instruction that describes a task. Write a response that "
                                  "appropriately completes the request.\n\n{system}\n ",
                                  "### Instruction:\n{input}\n\n### Response:", sep="\n\n"),
    "vicuna": PromptTemplate(_VICUNA_SYS, "USER: {input} ASSISTANT:", sep="\n"),
    "deepseek_coder": PromptTemplate(_DEEPSEEK_CODER_SYS, "### Instruction:\n{input}\n### Response:\n", sep="\n"),
    # XTuner 0.1.23 spells it both ways (the second slated for removal there); both are accepted here
    "deepseekcoder": PromptTemplate(_DEEPSEEK_CODER_SYS, "### Instruction:\n{input}\n### Response:\n", sep="\n"),
    "deepseek_moe": PromptTemplate("[INST] {system} [/INST]\n", "[INST] {input} [/INST]", sep="\n"),
    "deepseek_v2": PromptTemplate("{system}\n\n", "User: {input}\n\nAssistant: ", "<｜end▁of▁sentence｜>", True,
                                  "", ("<｜end▁of▁sentence｜>",)),
    "mistral": PromptTemplate("[INST] {system} [/INST]\n", "[INST] {input} [/INST]", sep="\n"),
    "mixtral": PromptTemplate("[INST] {system} [/INST]\n", "[INST] {input} [/INST]", sep="\n"),
    "minicpm": PromptTemplate("{system}\n", "<用户> {input} <AI>", sep="\n"),
    "gemma": PromptTemplate("<start_of_turn>system\n{system}<end_of_turn>\n",
                            "<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
                            "<end_of_turn>", False, "\n", ("<end_of_turn>",)),
    "cohere_chat": PromptTemplate("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
                                  "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|>"
                                  "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
                                  "<|END_OF_TURN_TOKEN|>", True, "", ("<|END_OF_TURN_TOKEN|>",)),
    "llama3_chat": PromptTemplate("<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                                  "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
                                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
                                  "<|eot_id|>", True, "", ("<|eot_id|>",)),
    "phi3_chat": PromptTemplate("<|system|>\n{system}<|end|>\n", "<|user|>\n{input}<|end|>\n<|assistant|>\n",
                                "<|end|>", True, "\n", ("<|end|>",)),
}
TEMPLATE_NAMES = ("hf", *TEMPLATES)


class Renderer(Protocol):
    name: str
    stop_words: tuple[str, ...]
    system: str | None  # given to conversations without a system message

    def render(self, conv: Conversation, add_generation_prompt: bool = False) -> Segments: ...


def _turns(conv: Conversation) -> tuple[str | None, list[tuple[Message, Message | None]]]:
    """(system, [(user, assistant or None)]) for a checked conversation; the last reply may be missing."""
    msgs = conv.messages
    system = None
    if msgs and msgs[0].role == "system":
        system, msgs = msgs[0].content, msgs[1:]
    turns = []
    for i in range(0, len(msgs), 2):
        turns.append((msgs[i], msgs[i + 1] if i + 1 < len(msgs) else None))
    return system, turns


class XTunerTemplate:
    """XTuner's string templates; BOS/EOS are inserted as the tokenizer's token strings."""

    def __init__(self, name: str, template: PromptTemplate, bos: str, eos: str, system: str | None = None):
        self.name = name
        self.t = template
        self.bos = bos
        self.eos = eos
        self.system = system
        self.stop_words = tuple(dict.fromkeys([*template.stop_words, *([eos] if eos else [])]))

    def render(self, conv: Conversation, add_generation_prompt: bool = False) -> Segments:
        system, turns = _turns(apply_system(conv, self.system))
        out: Segments = []
        need_bos = True
        for i, (user, reply) in enumerate(turns):
            prompt = self.bos if need_bos else ""
            if i == 0 and system:
                prompt += self.t.system.format(system=system, round=i + 1)
            prompt += self.t.instruction.format(input=user.content, round=i + 1)
            out.append((prompt, False))
            if reply is None:
                break
            out.append((reply.content + self.t.suffix, reply.loss))
            need_bos = not self.t.suffix_as_eos
            if need_bos and self.eos:
                out.append((self.eos, reply.loss))
            if self.t.sep:
                out.append((self.t.sep, False))
        if not add_generation_prompt and turns and turns[-1][1] is None:
            raise RecordError("the conversation ends with a user turn")
        return out


class HFTemplate:
    """The tokenizer's chat template. A template must render each conversation as an extension of its
    prefixes (true of ChatML, Llama 3, Qwen 2.5, SmolLM2 ...); one that rewrites history is refused."""

    name = "hf"

    def __init__(self, tokenizer: Any, system: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("prompt_template 'hf' needs a tokenizer with a chat template; this tokenizer has none "
                            f"(pick one of: {', '.join(TEMPLATES)})")
        self.tokenizer = tokenizer
        self.system = system
        eos = tokenizer.eos_token
        self.stop_words = (eos,) if eos else ()

    def _text(self, messages: list[dict], gen: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        except TemplateError as e:
            # e.g. raise_exception('System role not supported'): this record does not fit the template
            raise RecordError(f"chat template: {(str(e) or type(e).__name__).splitlines()[0]}") from None

    def render(self, conv: Conversation, add_generation_prompt: bool = False) -> Segments:
        conv = apply_system(conv, self.system)
        msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
        out: Segments = []
        done = ""
        for i, m in enumerate(conv.messages):
            if m.role != "assistant":
                continue
            prefix = self._text(msgs[:i], True)
            full = self._text(msgs[: i + 1], False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise DataError("the tokenizer's chat template does not render conversations incrementally; "
                                "pick an XTuner template with data.prompt_template")
            out.append((prefix[len(done):], False))
            out.extend(self._split_reply(full[len(prefix):], m))
            done = full
        if add_generation_prompt and conv.messages and conv.messages[-1].role == "user":
            text = self._text(msgs, True)
            if not text.startswith(done):
                raise DataError("the tokenizer's chat template rewrites earlier turns; pick an XTuner template")
            out.append((text[len(done):], False))
        return [(t, loss) for t, loss in out if t]

    def _split_reply(self, text: str, m: Message) -> Segments:
        """The reply with its end-of-turn token is trained on; what the template adds after it is not."""
        start = text.find(m.content)
        after = start + len(m.content) if start >= 0 else 0
        for stop in self.stop_words:
            j = text.find(stop, after)
            if j >= 0:
                cut = j + len(stop)
                return [(text[:cut], m.loss), (text[cut:], False)]
        return [(text, m.loss)]


def get_template(name: str, tokenizer: Any, system: str | None = None) -> Renderer:
    """The renderer for a template name; `system` is the default system prompt (None: no default)."""
    if name == "hf":
        return HFTemplate(tokenizer, system)
    if name not in TEMPLATES:
        import difflib

        close = difflib.get_close_matches(name, TEMPLATE_NAMES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataError(f"unknown prompt template '{name}'{hint} (known: {', '.join(TEMPLATE_NAMES)})")
    return XTunerTemplate(name, TEMPLATES[name], tokenizer.bos_token or "", tokenizer.eos_token or "", system)


def stop_token_ids(tokenizer: Any, words: Sequence[str]) -> tuple[list[int], list[str]]:
    """(ids of the stop words that are one token of the vocabulary, the other stop words): generation ends on
    the first kind by id, on the second by matching text."""
    ids, texts = [], []
    for w in words:
        tid = tokenizer.convert_tokens_to_ids(w) if w else None
        if isinstance(tid, int) and tokenizer.convert_ids_to_tokens(tid) == w:  # not the unknown-token id
            ids.append(tid)
        elif w:
            texts.append(w)
    return ids, texts


def apply_system(conv: Conversation, system: str | None) -> Conversation:
    """Give a conversation the default system prompt if it has none."""
    if system and conv.system is None:
        return Conversation([Message("system", system), *conv.messages])
    return conv
