"""Scoring of the quality benchmark (bench/scoring.py); no model is loaded. bench/quality.py: test_bench_quality.py."""

from __future__ import annotations

import importlib
import json
import sys
from decimal import Decimal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def _bench_module(name: str):
    """bench/ holds scripts, not a package: import them the way `python bench/quality.py` does."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


scoring = _bench_module("scoring")


@pytest.mark.parametrize("text, expected", [
    ("The answer is 18.", ["18"]),
    ("She makes $1,234.50 a week", ["1234.50"]),
    ("It costs $ 7 and then -3 degrees", ["7", "-3"]),
    ("10-5 = 5", ["10", "5", "5"]),
    ("about .5 of it, 2.0 left", ["0.5", "2.0"]),
    ("1,2,3", ["1", "2", "3"]),
    ("no digits here", []),
])
def test_find_numbers(text, expected):
    assert scoring.find_numbers(text) == [Decimal(x) for x in expected]


@pytest.mark.parametrize("reply, expected", [
    ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars.\nThe final answer is 18.", "18"),
    ("So the total is $1,080.", "1080"),
    ("The answer is \\boxed{42}. Check: 6 * 7 = 42, and 40 + 2.", "42"),
    ("Result: \\boxed{\\frac{3}{1}} hmm \\boxed{-12.5}", "-12.5"),
    ("\\boxed{x} but the last number is 7", "7"),  # an empty box falls back to the reply
    ("The temperature fell to -4 degrees", "-4"),
])
def test_extract_answer_number(reply, expected):
    assert scoring.extract_answer_number(reply) == Decimal(expected)


def test_extract_answer_number_none():
    assert scoring.extract_answer_number("I do not know.") is None


def test_gold_number_and_numeric_comparison():
    assert scoring.gold_number("9 * 2 = <<9*2=18>>18\n#### 18") == Decimal(18)
    assert scoring.gold_number("#### 1,000") == Decimal(1000)
    assert scoring.gold_number("#### -5") == Decimal(-5)
    assert scoring.numbers_equal(Decimal("18"), Decimal("18.0"))
    assert not scoring.numbers_equal(Decimal("18"), None)
    assert scoring.gsm8k_correct("so she makes 18.00 dollars", "...\n#### 18")
    assert not scoring.gsm8k_correct("18 eggs, so 36 dollars", "#### 18")
    with pytest.raises(ValueError):
        scoring.gold_number("no marker 18")


@pytest.mark.parametrize("reply, answers, expected", [
    ("A spider has 8 legs.", ["8", "eight"], True),
    ("A spider has 18 legs.", ["8"], False),
    ("Eight legs.", ["8", "eight"], True),
    ("The symbol is Au.", ["Au"], True),
    ("Gold is found in Australia.", ["Au"], False),
    ("Sodium's symbol is NA (natrium)", ["Na"], True),
    ("It is the name of an element", ["Na"], False),
    ("The mitochondria.", ["mitochondri"], True),  # longer answers match inside words: a stem is enough
    ("Leonardo da Vinci painted it", ["leonardo"], True),
    ("Water boils at 100°C.", ["100"], True),
    ("It boils at 1000 degrees", ["100"], False),
    ("", ["blue"], False),
])
def test_knowledge_correct(reply, answers, expected):
    assert scoring.knowledge_correct(reply, answers) is expected


def test_detect_kind_and_is_correct():
    knowledge = {"question": "Q?", "answers": ["blue"]}
    gsm8k = {"question": "Q?", "answer": "steps\n#### 4"}
    assert scoring.detect_kind(knowledge) == "knowledge"
    assert scoring.detect_kind(gsm8k) == "gsm8k"
    assert scoring.is_correct("knowledge", knowledge, "Blue.")
    assert scoring.is_correct("gsm8k", gsm8k, "2 + 2 = 4.0")
    with pytest.raises(ValueError):
        scoring.detect_kind({"question": "Q?"})


@pytest.mark.parametrize("name, fields, least", [("knowledge_extra.jsonl", {"question", "answers"}, 40),
                                                  ("knowledge_kinds.jsonl", {"question", "answers", "kind"}, 150)])
def test_bench_knowledge_sets_are_well_formed(name, fields, least):
    items = [json.loads(line) for line in (BENCH / "data" / name).read_text().splitlines()]
    assert len(items) >= least
    assert len({item["question"] for item in items}) == len(items)
    for item in items:
        assert set(item) == fields and item["answers"]
        assert not scoring.knowledge_correct(item["question"], item["answers"]), item  # echoing never scores
    shared = REPO.parent / "shared" / "data" / "knowledge_dev.jsonl"
    if shared.exists():  # no question of the project's own sets repeats one of the shared set
        dev = {json.loads(line)["question"].casefold() for line in shared.read_text().splitlines() if line.strip()}
        assert not dev & {item["question"].casefold() for item in items}
