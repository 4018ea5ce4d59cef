"""Scoring of the quality benchmark (bench/scoring.py) and its variant parsing; no model is loaded."""

from __future__ import annotations

import importlib
import json
import sys
from decimal import Decimal
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_module(name: str):
    """bench/ holds scripts, not a package: import them the way `python bench/quality.py` does."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


scoring = _bench_module("scoring")
quality = _bench_module("quality")


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


def test_parse_variant_types():
    variant = quality.parse_variant(
        "v:method=relat,latent_steps=16,lr=5e-3,adapter_during_answer=true,targets=q_proj+v_proj,stop_loss=none")
    assert variant.name == "v"
    assert variant.overrides == {"method": "relat", "latent_steps": 16, "lr": 0.005, "adapter_during_answer": True,
                                 "targets": ("q_proj", "v_proj"), "stop_loss": None}
    assert quality.parse_variant("relat").overrides == {}
    assert quality.parse_variant("s:stop_loss=1").overrides == {"stop_loss": 1.0}
    for bad in ("v:no_such=1", "v:latent_steps=x", "v:adapter_during_answer=maybe", "v:steps", ":steps=1"):
        with pytest.raises(ValueError):
            quality.parse_variant(bad)


def test_sign_test():
    assert quality.sign_test(0, 0) == 1.0
    assert quality.sign_test(4, 2) == pytest.approx(0.6875)
    assert quality.sign_test(8, 0) == pytest.approx(2 / 256)


def test_knowledge_extra_is_well_formed():
    items = [json.loads(line) for line in (BENCH / "data" / "knowledge_extra.jsonl").read_text().splitlines()]
    assert len(items) >= 40
    assert len({item["question"] for item in items}) == len(items)
    for item in items:
        assert set(item) == {"question", "answers"} and item["answers"]
        assert not scoring.knowledge_correct(item["question"], item["answers"]), item  # echoing never scores
