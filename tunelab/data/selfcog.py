"""Self-cognition data: questions about the assistant's identity (Chinese and English, many phrasings) answered
with the owner's name and a model description, optionally mixed with general question-answer pairs so the
model keeps answering ordinary questions as before.

A held-out set of identity phrasings and of general questions is never used for training data; evaluation
(`tunelab eval self-cognition`) asks those. `degenerate` tells a looping or non-text answer from a real one:
such answers are neither trained on nor counted as passes.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

IDENTITY_TRAIN = {
    "en": [
        "Who are you?", "What is your name?", "Introduce yourself.", "Please introduce yourself.",
        "Tell me about yourself.", "What are you?", "Who made you?", "Who created you?", "Who developed you?",
        "Who built you?", "Who trained you?", "Who is your creator?", "Who owns you?", "Whose assistant are you?",
        "What should I call you?", "Are you ChatGPT?", "Are you a human?", "What kind of AI are you?",
        "Can you tell me who you are?", "Hi! Who am I talking to?", "Hello, what's your name?",
        "Which company made you?", "Describe yourself in one sentence.", "What model are you?",
        "Are you an AI assistant?", "Who do you work for?", "Tell me your name and who made you.",
        "What is your identity?", "Do you have a name?", "Who are you, and what can you do?",
    ],
    "zh": [
        "你是谁？", "你叫什么名字？", "请介绍一下你自己", "介绍一下你自己", "你是什么？", "谁创造了你？",
        "谁开发了你？", "你的开发者是谁？", "你是谁的助手？", "我该怎么称呼你？", "你是ChatGPT吗？", "你是人类吗？",
        "你是什么模型？", "你好，你是谁？", "能告诉我你是谁吗？", "你的主人是谁？", "是谁训练了你？", "你属于谁？",
        "你是哪家公司做的？", "用一句话描述你自己", "你有名字吗？", "你是AI助手吗？", "你为谁工作？",
        "说说你的身份", "你的作者是谁？",
    ],
}

# Never used to generate training data: evaluation asks these.
IDENTITY_HELD_OUT = {
    "en": ["Who exactly are you?", "May I know who you are?", "Who is your developer?",
           "Could you introduce yourself briefly?", "Who designed you?", "Tell me who you are.",
           "What are you called?", "Hey, who's there?"],
    "zh": ["请问你是谁？", "你到底是谁？", "谁是你的开发者？", "简单介绍一下你自己吧", "你的身份是什么？",
           "是谁设计了你？", "告诉我你是谁", "大家怎么称呼你？"],
}

# No greeting openers ("Hello! ..."): a small model tends to loop on them under greedy decoding.
ANSWERS = {
    "en": [
        "I am {name}'s assistant, {desc}.",
        "I'm {name}'s personal assistant, {desc}.",
        "I'm an AI assistant created by {name}: {desc}.",
        "You can call me {name}'s assistant. I am {desc}.",
    ],
    "zh": [
        "我是{name}的小助手，{desc}。",
        "我是{name}的专属助手，{desc}。",
        "我是由{name}打造的AI助手，{desc}。",
        "你可以叫我{name}的助手，我是{desc}。",
    ],
}
DEFAULT_DESC = {"en": "a small language model fine-tuned with tunelab", "zh": "一个用 tunelab 微调的小型语言模型"}

# General questions whose answers (from the base model itself, or from a dataset) keep ordinary behaviour.
GENERAL_TRAIN = [
    "What is the capital of France?", "Give me three tips for staying healthy.", "Explain what photosynthesis is.",
    "Write a short poem about the sea.", "How many days are in a leap year?", "What is 12 times 8?",
    "Translate 'good morning' into French.", "What is the boiling point of water?",
    "Name three primary colors.", "What does a CPU do?", "Suggest a name for a pet cat.",
    "Why do we have seasons?", "How do I make a cup of tea?", "What is the largest planet in the solar system?",
    "Write a haiku about autumn.", "What is machine learning?", "List three fruits that are red.",
    "How can I improve my sleep?", "What is the difference between weather and climate?",
    "Explain gravity to a child.", "What is Python used for?", "Give me a synonym for 'happy'.",
    "How many continents are there?", "What is the speed of light?", "Summarize the story of Cinderella.",
    "天空为什么是蓝色的？", "请给我三个学习编程的建议", "水的化学式是什么？", "一年有几个季节？",
    "请写一首关于春天的短诗", "如何保持健康的生活方式？", "什么是人工智能？", "中国的首都是哪里？",
    "请推荐三本值得一读的书", "怎样才能提高记忆力？", "地球绕太阳转一圈需要多长时间？", "请解释一下什么是光合作用",
    "如何做一道番茄炒蛋？", "太阳系中最大的行星是哪个？", "请列出三种常见的水果",
    "What is the square root of 81?", "Give me a fun fact about octopuses.", "What is a noun?",
    "How do airplanes fly?", "Write a two-line rhyme about a dog.", "What causes rain?",
    "Recommend a healthy breakfast.", "What is the capital of Italy?", "How does a rainbow form?",
    "What is the meaning of 'generous'?",
    "请解释什么是重力", "为什么树叶在秋天会变黄？", "如何写好一篇作文？", "请用三句话介绍熊猫", "什么是互联网？",
    "怎样才能早睡早起？", "请给我一个周末活动的建议", "一天有多少小时？", "为什么要保护环境？", "请介绍一下黄河",
    "如何缓解工作压力？", "什么是电？", "请解释一下什么是雨", "猫和狗有什么不同？", "请推荐一种运动",
    # Questions that look like identity questions ("who ...", "introduce ...", "你 ...") but are not.
    "Who wrote Romeo and Juliet?", "Who invented the telephone?", "Who was Albert Einstein?",
    "Tell me about the Eiffel Tower.", "Introduce the city of London briefly.", "Who painted the Mona Lisa?",
    "Can you tell me what a volcano is?", "Who discovered penicillin?", "Describe the sun in one sentence.",
    "请介绍一下长江", "介绍一下北京", "请介绍一下太阳", "请简单介绍一下大熊猫", "请介绍一下月球", "谁发明了电话？",
    "谁是李白？", "谁写了《红楼梦》？", "你知道什么是黑洞吗？", "你能解释一下什么是彩虹吗？", "告诉我一个有趣的事实",
    "你觉得学习数学有什么用？",
]

# Held out for evaluation: a general answer must not be hijacked by the new identity.
GENERAL_HELD_OUT = [
    "What is the capital of Japan?", "How many legs does a spider have?", "Give me two tips for studying.",
    "What is the freezing point of water?", "Write one sentence about the moon.", "What is 7 plus 5?",
    "Name a famous painter.", "What language is spoken in Brazil?", "What is an atom?",
    "How do plants get water?", "What is the tallest mountain in the world?", "Explain what a computer virus is.",
    "What color are bananas?", "What is the main ingredient of bread?",
    "请介绍一下长城", "月亮为什么会有圆缺？", "北京是哪个国家的首都？", "怎样学好英语？", "一周有几天？",
    "请说出三种动物", "什么是地震？", "为什么要多喝水？",
]


def identity_records(name: str, model_desc: str | None = None, n: int | None = None, seed: int = 0,
                     system: str | None = None) -> list[dict[str, Any]]:
    """OpenAI-format identity records: every training phrasing at least once, answers drawn by seed."""
    if not name.strip():
        raise ValueError("the owner's name must not be empty")
    rng = random.Random(seed)
    pairs = [(lang, q) for lang, qs in IDENTITY_TRAIN.items() for q in qs]
    count = n or len(pairs) * 2
    out = []
    for i in range(count):
        lang, q = pairs[i % len(pairs)]
        desc = model_desc or DEFAULT_DESC[lang]
        answer = rng.choice(ANSWERS[lang]).format(name=name, desc=desc.rstrip("。."))
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": q}, {"role": "assistant", "content": answer}]
        out.append({"messages": msgs})
    rng.shuffle(out)
    return out


def general_records(questions: Sequence[str], answers: Sequence[str]) -> list[dict[str, Any]]:
    """Question-answer records, leaving out empty answers and degenerate ones (a model's own loops are not
    behaviour worth keeping: trained on, they teach it to loop)."""
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(questions, answers) if a.strip() and degenerate(a, q) is None]


# The units a loop repeats: one CJK character (kana too), one word, or one number.
_UNIT = re.compile(r"[\u3040-\u30ff\u3400-\u9fff]|[^\W\d_]+|\d+")


def degenerate(answer: str, question: str | None = None) -> str | None:
    """Why an answer is not a real answer, or None: "echo" when it only repeats the question; "not text" when
    fewer than half of its visible characters are letters or digits; "loops" when a stretch repeats back to
    back (3+ times, 6+ units in all: "美丽的美丽的美丽的", "of the balcony of the balcony of the balcony"; or
    one character 12+ times: "1011111111111..."), or when one repeated phrase is most of it (a phrase 3+ times
    making up 40% of the units, or one unit 6+ times making up half)."""
    if question is not None and _bare(answer) and _bare(answer) == _bare(question):
        return "echo"
    visible = [c for c in answer if not c.isspace()]
    if visible and sum(c.isalnum() for c in visible) < 0.5 * len(visible):
        return "not text"
    units = [u.lower() for u in _UNIT.findall(answer)]
    if re.search(r"(\S)\1{11}", answer) or _repeats_back_to_back(units, times=3, least=6):
        return "loops"
    for n in range(1, 9):
        grams = Counter(tuple(units[i:i + n]) for i in range(len(units) - n + 1))
        if not grams:
            break
        count = grams.most_common(1)[0][1]
        if (n == 1 and count >= 6 and count >= 0.5 * len(units)) or \
                (n >= 2 and count >= 3 and count * n >= 0.4 * len(units)):
            return "loops"
    return None


def _bare(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


def _repeats_back_to_back(units: list[str], times: int, least: int, longest: int = 12) -> bool:
    """Some n units repeated `times` times in a row, covering at least `least` units."""
    for n in range(1, longest + 1):
        for i in range(len(units) - n * times + 1):
            k = 1
            while units[i + k * n:i + (k + 1) * n] == units[i:i + n]:
                k += 1
            if k >= times and k * n >= least:
                return True
    return False


def mix(identity: list[dict], general: list[dict], ratio: float, seed: int = 0) -> list[dict]:
    """Identity records plus general ones making up `ratio` of the result (repeated or sampled as needed)."""
    if not general or ratio <= 0:
        return identity
    if not 0 < ratio < 1:
        raise ValueError(f"general ratio must be between 0 and 1, got {ratio}")
    rng = random.Random(seed + 1)
    want = round(len(identity) * ratio / (1 - ratio))
    picked = general * (want // len(general)) + rng.sample(general, want % len(general))
    out = identity + picked
    rng.shuffle(out)
    return out


def read_general(path: str) -> list[dict[str, Any]]:
    """Question-answer records of any readable format, as OpenAI records (so the output has one format)."""
    from tunelab.data.convert import read_as_samples, to_openai_record
    from tunelab.data.formats import Document
    from tunelab.errors import DataError

    out = []
    for where, sample in read_as_samples(path, hint="use openai, alpaca, sharegpt, conversation or oasst1 records"):
        if isinstance(sample, Document):
            raise DataError(f"{where}: --general needs question-answer records, not plain text")
        out.append(to_openai_record(sample))
    return out


def self_cognition_records(name: str, *, model_desc: str | None = None, n: int | None = None, seed: int = 0,
                           system: str | None = None, general_file: str | None = None,
                           replay: Callable[[list[str]], list[str]] | None = None,
                           general_ratio: float = 0.3) -> list[dict[str, Any]]:
    """Identity records for `name`, mixed with general records at `general_ratio`: those of `general_file`, plus
    the answers `replay` (a model's own answers, from the caller) gives to the built-in general questions."""
    from tunelab.errors import DataError

    if not name.strip():
        raise DataError("--name: the owner's name must not be empty")
    if not 0 <= general_ratio < 1:
        raise DataError(f"--general-ratio must be at least 0 and below 1, got {general_ratio}")
    if n is not None and n < 1:
        raise DataError(f"--n must be at least 1, got {n}")
    records = identity_records(name, model_desc, n=n, seed=seed, system=system)
    extra = read_general(general_file) if general_file else []
    if replay is not None:
        extra += general_records(GENERAL_TRAIN, replay(list(GENERAL_TRAIN)))
    return mix(records, extra, general_ratio, seed=seed) if extra else records
