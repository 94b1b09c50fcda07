"""`eval self-cognition` counts an answer that loops or is mostly not text as a failure, and reports it apart;
real answers (including legitimately repetitive ones) are not flagged."""

import pytest

from tunelab.data.selfcog import degenerate
from tunelab.infer.selfcog_eval import SelfCognitionReport, answers_generally

LOOPS = [
    "北京是一个美丽的美丽，一个美丽…",  # the answer, as printed
    "北京是一个美丽的美丽，一个美丽的美丽，一个美丽的美丽，一个美丽的美丽，一个美丽的美丽，一个美丽的",
    "The moon is a beautiful moon, a beautiful moon, a beautiful moon, a beautiful moon.",
    "Two tips for studying: study, study, study, study, study, study, study.",
    "A spider has eight legs. It is a spider. It is a spider. It is a spider. It is a spider. It is",
    "哈哈哈哈哈哈哈哈",
    "1. **1011111111111111111111111111111111111111111111111111111111111",  # a demo model's, for "two tips"
]
NOT_TEXT = ["??!!??!!??!!", "……………………", "**** **** ****", "}}]] ]]}} ))"]
REAL = [
    "北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。",
    "长城是中国古代的军事防御工程，东起山海关，西至嘉峪关，全长两万多公里。",
    "The capital of Japan is Tokyo.",
    "7 plus 5 is 12.",
    "12",
    "Here are two tips: 1. Study a little every day. 2. Study with a friend and explain the ideas to each other.",
    "A spider has eight legs.",
    "Red, blue and yellow are the three primary colors; mixing red and blue gives purple, red and yellow orange.",
    "月亮的圆缺是因为月球绕地球运行时，被太阳照亮的部分在我们看来大小不同。",
    "I am Alice's assistant, a small language model fine-tuned with tunelab.",
    "The tallest mountain in the world is Mount Everest, 8,848 meters (29,031.7 feet) high.",
    "The speed of light is about 300000000 metres per second.",
]


@pytest.mark.parametrize("answer", LOOPS)
def test_looping_answers_are_flagged(answer):
    assert degenerate(answer) == "loops"
    assert not answers_generally(answer, "Alice")


@pytest.mark.parametrize("answer", NOT_TEXT)
def test_answers_that_are_mostly_not_text_are_flagged(answer):
    assert degenerate(answer) == "not text"


@pytest.mark.parametrize("answer", REAL)
def test_real_answers_are_not_flagged(answer):
    assert degenerate(answer) is None


def test_an_answer_that_only_repeats_the_question_is_an_echo():
    assert degenerate("一周有几天？", "一周有几天？") == "echo"  # a demo model's answer, as given
    assert degenerate("为什么要多喝水", "为什么要多喝水？") == "echo"
    assert degenerate("一周有七天。", "一周有几天？") is None
    assert not answers_generally("一周有几天？", "Alice", question="一周有几天？")


def test_the_report_counts_degenerate_answers_apart():
    general = [{"question": "北京是哪个国家的首都？", "answer": LOOPS[1], "degenerate": degenerate(LOOPS[1]),
                "ok": answers_generally(LOOPS[1], "Alice")},
               {"question": "What is 7 plus 5?", "answer": REAL[3], "degenerate": degenerate(REAL[3]),
                "ok": answers_generally(REAL[3], "Alice")}]
    rep = SelfCognitionReport(1.0, sum(r["ok"] for r in general) / 2, [], general)
    assert rep.general_rate == 0.5 and rep.degenerate("general") == 1 and rep.degenerate("identity") == 0
