"""`tunelab eval self-cognition`: did the model learn its new identity without losing its general behaviour?

Asks the held-out identity phrasings (Chinese and English, never used in training data) and a fixed set of
held-out general questions, greedily, and reports two rates: identity answers that name the owner, and general
answers that are not hijacked by the identity: they neither mention the owner nor repeat a stretch of an
identity answer (6 Chinese characters or 15 other characters in a row). An answer that loops or is mostly not
text fails either way, and is counted separately (a looping answer can name the owner or avoid the identity by
accident; a rate that counts it as a pass flatters the model).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from tunelab.data.formats import Conversation, Message
from tunelab.data.selfcog import ANSWERS, DEFAULT_DESC, GENERAL_HELD_OUT, IDENTITY_HELD_OUT, degenerate
from tunelab.model.generate import ChatModel, GenerationOptions, generate_batch


@dataclass
class SelfCognitionReport:
    identity_rate: float
    general_rate: float
    identity: list[dict] = field(default_factory=list)
    general: list[dict] = field(default_factory=list)

    def degenerate(self, part: str) -> int:
        return sum(bool(r["degenerate"]) for r in getattr(self, part))

    def summary(self) -> dict:
        return {"identity_rate": self.identity_rate, "general_rate": self.general_rate,
                "identity_questions": len(self.identity), "general_questions": len(self.general),
                "identity_degenerate": self.degenerate("identity"), "general_degenerate": self.degenerate("general")}

    def lines(self) -> list[str]:
        """Every question and answer, marked ok or FAIL (with why, for a degenerate answer)."""
        return [f"[{'ok' if r['ok'] else 'FAIL'}{': ' + r['degenerate'] if r['degenerate'] else ''}] "
                f"{r['question']} -> {r['answer']}" for r in self.identity + self.general]


def names_owner(answer: str, name: str) -> bool:
    """The name as a whole word ("Ada" is not found in "Canada"); CJK text around it is fine."""
    return re.search(rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])", answer, flags=re.IGNORECASE) is not None


_CJK = re.compile(r"[\u3400-\u9fff]")


def echoes_identity(answer: str, identity_answers: list[str]) -> bool:
    """True if the answer repeats a long stretch of any identity answer."""
    for ref in identity_answers:
        m = difflib.SequenceMatcher(None, answer, ref, autojunk=False).find_longest_match(0, len(answer), 0, len(ref))
        piece = answer[m.a:m.a + m.size]
        if len(_CJK.findall(piece)) >= 6 or len(piece.strip()) >= 15:
            return True
    return False


def answers_generally(answer: str, name: str, model_desc: str | None = None, question: str | None = None) -> bool:
    """A general question answered as one: something said, not the identity, not a loop or an echo."""
    return bool(answer.strip()) and not is_hijacked(answer, name, model_desc) and \
        degenerate(answer, question) is None


def is_hijacked(answer: str, name: str, model_desc: str | None = None) -> bool:
    refs = [t.format(name=name, desc=(model_desc or DEFAULT_DESC[lang]).rstrip("。."))
            for lang, ts in ANSWERS.items() for t in ts]
    return names_owner(answer, name) or echoes_identity(answer, refs)


def replay_answers(model: str, questions: list[str], max_new_tokens: int = 96) -> list[str]:
    """The model's own greedy answers: training on them keeps its general behaviour."""
    from tunelab.model.generate import load_chat_model

    chat = load_chat_model(model)
    convs = [Conversation([Message("user", q)]) for q in questions]
    # One batch: on a CPU, fewer sequential decoding steps beat the extra padding (34 s vs 61 s for 86 questions).
    return generate_batch(chat, convs, GenerationOptions(max_new_tokens=max_new_tokens), batch_size=128)


def held_out_questions() -> list[str]:
    """Every question evaluate_self_cognition asks: the identity ones, then the general ones."""
    return _identity_questions() + list(GENERAL_HELD_OUT)


def _identity_questions() -> list[str]:
    return [q for qs in IDENTITY_HELD_OUT.values() for q in qs]


def evaluate_self_cognition(chat: ChatModel, name: str, system: str | None = None, model_desc: str | None = None,
                            max_new_tokens: int = 64, answered: Callable[[int], None] = lambda n: None
                            ) -> SelfCognitionReport:
    """`answered(n)` is called as answers come in (a progress bar)."""
    questions = _identity_questions()

    def ask(qs: list[str]) -> list[str]:
        convs = [Conversation(([Message("system", system)] if system else []) + [Message("user", q)]) for q in qs]
        answers = generate_batch(chat, convs, GenerationOptions(max_new_tokens=max_new_tokens))
        answered(len(answers))
        return answers

    ident = [{"question": q, "answer": a, "degenerate": degenerate(a, q),
              "ok": names_owner(a, name) and degenerate(a, q) is None} for q, a in zip(questions, ask(questions))]
    general = [{"question": q, "answer": a, "degenerate": degenerate(a, q),
                "ok": answers_generally(a, name, model_desc, q)}
               for q, a in zip(GENERAL_HELD_OUT, ask(GENERAL_HELD_OUT))]
    return SelfCognitionReport(sum(r["ok"] for r in ident) / len(ident),
                               sum(r["ok"] for r in general) / len(general), ident, general)
