"""Scoring of free-form replies for the quality benchmark (bench/quality.py); pure functions, no model.

Two kinds of question/answer files:
- knowledge (`question`, `answers`): a reply counts when it contains one of the accepted answers, ignoring case;
  an answer of three characters or fewer ("Au", "8", "366") must appear as a whole word, so that "8" does not
  match "18" and "Na" does not match "name" (the rule of ../shared/data/README.md).
- gsm8k (`question`, `answer` ending in `#### <number>`): the gold number follows `####`; the model's answer is
  the content of its last `\\boxed{...}` if it wrote one, else the last number in the reply. Numbers are read
  with thousands separators, a currency sign, a sign and decimals ("$1,234.50", "-3", ".5"), and compared
  exactly as decimals, so "18" equals "18.0" and "18.00" (LatentMAS compares strings and counts those wrong).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

SHORT_ANSWER_CHARS = 3  # answers this short must match as a whole word

# A number as people write it: optional sign and currency, thousands groups or plain digits, optional decimals.
# The minus counts only when it does not follow a word or digit, so "10-5" reads as 10 and 5, not 10 and -5.
_NUMBER = re.compile(r"(?<![\w.])(-)?(?:\$\s?)?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_BOXED = re.compile(r"\\boxed\s*\{")


def detect_kind(item: dict) -> str:
    """`knowledge` for items with an `answers` list, `gsm8k` for items with a `#### ` answer."""
    if isinstance(item.get("answers"), list):
        return "knowledge"
    if isinstance(item.get("answer"), str) and "####" in item["answer"]:
        return "gsm8k"
    raise ValueError(f"cannot tell the kind of item with fields {sorted(item)}: want `answers` or `answer` with ####")


def contains_answer(reply: str, answer: str) -> bool:
    """Case-insensitive containment; short answers only as whole words (no letter or digit on either side)."""
    answer = answer.strip()
    if not answer:
        return False
    if len(answer) <= SHORT_ANSWER_CHARS:
        pattern = r"(?<![^\W_])" + re.escape(answer) + r"(?![^\W_])"
        return re.search(pattern, reply, flags=re.IGNORECASE) is not None
    return answer.casefold() in reply.casefold()


def knowledge_correct(reply: str, answers: list[str]) -> bool:
    return any(contains_answer(reply, answer) for answer in answers)


def parse_number(text: str) -> Decimal | None:
    """The first number in `text` as a Decimal, or None."""
    numbers = find_numbers(text)
    return numbers[0] if numbers else None


def find_numbers(text: str) -> list[Decimal]:
    """Every number in `text`, in order, with separators, currency signs and signs handled."""
    values = []
    for match in _NUMBER.finditer(text):
        try:
            value = Decimal(match.group(2).replace(",", ""))
        except InvalidOperation:  # pragma: no cover - the pattern only admits valid decimals
            continue
        values.append(-value if match.group(1) else value)
    return values


def last_boxed(reply: str) -> str | None:
    """The content of the last `\\boxed{...}`, braces balanced, or None when there is none."""
    starts = [m.end() for m in _BOXED.finditer(reply)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for index in range(start, len(reply)):
        depth += {"{": 1, "}": -1}.get(reply[index], 0)
        if depth == 0:
            return reply[start:index]
    return reply[start:]  # unclosed (the reply hit max_tokens): take what there is


def extract_answer_number(reply: str) -> Decimal | None:
    """The model's final number: from the last \\boxed{} if any holds a number, else the last number written."""
    boxed = last_boxed(reply)
    if boxed is not None:
        numbers = find_numbers(boxed)
        if numbers:
            return numbers[-1]
    numbers = find_numbers(reply)
    return numbers[-1] if numbers else None


def gold_number(answer: str) -> Decimal:
    """The number after `####` in a GSM8K solution."""
    _, sep, tail = answer.rpartition("####")
    value = parse_number(tail) if sep else None
    if value is None:
        raise ValueError(f"no number after #### in {answer[-60:]!r}")
    return value


def numbers_equal(a: Decimal | None, b: Decimal | None) -> bool:
    return a is not None and b is not None and a == b


def gsm8k_correct(reply: str, answer: str) -> bool:
    return numbers_equal(extract_answer_number(reply), gold_number(answer))


def is_correct(kind: str, item: dict, reply: str) -> bool:
    """Score one reply against one item of the given kind."""
    if kind == "knowledge":
        return knowledge_correct(reply, item["answers"])
    if kind == "gsm8k":
        return gsm8k_correct(reply, item["answer"])
    raise ValueError(f"unknown kind {kind!r}")


def gold_text(kind: str, item: dict) -> str:
    """The expected answer, for display and the raw records."""
    if kind == "knowledge":
        return " | ".join(item["answers"])
    return str(gold_number(item["answer"]))
