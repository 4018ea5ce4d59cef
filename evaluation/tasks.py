"""Task formats: how an item of a JSONL file becomes a prompt, and how a reply is scored. Pure functions, no model.

Four formats, detected from an item's fields (`detect_task`) or named with --task:
- knowledge (`question`, `answers`): a reply counts when it contains one of the accepted answers, ignoring case;
  an answer of three characters or fewer ("Au", "8", "366") must appear as a whole word, so that "8" does not
  match "18" and "Na" does not match "name" (the rule of bench/data/README.md).
- maths: GSM8K (`question`, `answer` ending in `#### <number>`) or AIME (`problem` or `question`, an integer
  `answer`). The model's answer is the content of its last `\\boxed{...}` if it wrote one, else the last number in
  the reply. Numbers are read with thousands separators, a currency sign, a sign and decimals ("$1,234.50", "-3",
  ".5"), and compared exactly as decimals, so "18" equals "18.0" (LatentMAS compares strings and counts that
  wrong).
- choice (`question`, `choices` or `options`, `answer` a letter): the options are listed as "A. ...", and the
  model's letter is read from an explicit answer ("Answer: B", "(B)", "\\boxed{B}"), else from a reply that names
  exactly one option letter, else from a reply that quotes exactly one option's text. A reply naming two letters
  with nothing to choose between them is wrong: a scorer that took the first would reward hedging.
- code: HumanEval (`prompt`, `test` defining `check(candidate)`, `entry_point`) or MBPP (`text` or `prompt`,
  `test_list` of asserts). The last fenced python block of the reply (else the whole reply) is the solution; when
  it does not define the entry point, it is read as the body that continues the prompt, as HumanEval completions
  are. The program runs against the tests in a sandbox (relat_eval.sandbox).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

TASKS: tuple[str, ...] = ("knowledge", "maths", "choice", "code")

SHORT_ANSWER_CHARS = 3  # answers this short must match as a whole word
# Appended to every maths problem, for every method, because the small model otherwise often stops before stating
# a result; it is part of the question that relat reconstructs.
MATHS_INSTRUCTION = "Solve it step by step, then give the final answer as a number on the last line."
CHOICE_INSTRUCTION = "Answer with the letter of the correct option."
CODE_INSTRUCTION = "Write the complete Python function in one ```python code block."
# Enough for a one-sentence answer (48: the budget of the held-out scoring of issue 9), a worked solution, a letter
# with a reason, a short function.
DEFAULT_MAX_TOKENS = {"knowledge": 48, "maths": 256, "choice": 32, "code": 384}
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Score:
    correct: bool
    gold: str  # the expected answer, as text
    predicted: str | None  # what was read from the reply (for code: the sandbox's verdict)


# -- detection --------------------------------------------------------------------------------------------------

def detect_task(item: dict) -> str:
    """The format an item's fields say; ValueError when they say none."""
    if "test_list" in item or ("test" in item and "entry_point" in item):
        return "code"
    if isinstance(item.get("choices") or item.get("options"), list) and "answer" in item:
        return "choice"
    if isinstance(item.get("answers"), list):
        return "knowledge"
    answer = item.get("answer")
    if isinstance(answer, str) and "####" in answer:
        return "maths"
    if ("problem" in item or "question" in item) and _is_integer_answer(answer):
        return "maths"
    raise ValueError(f"cannot tell the task of an item with fields {sorted(item)}: want answers (knowledge), "
                     "answer with #### or an integer answer (maths), choices and a letter answer (choice), "
                     "or test and entry_point / test_list (code)")


def _is_integer_answer(answer: object) -> bool:
    if isinstance(answer, bool):
        return False
    if isinstance(answer, int):
        return True
    return isinstance(answer, str) and re.fullmatch(r"\s*-?\d+\s*", answer) is not None


def check_item(task: str, item: dict) -> None:
    """ValueError naming what an item of `task` lacks, so that a bad file stops the run before any model time."""
    question_text(task, item)
    gold_text(task, item)
    if task == "code" and "test_list" not in item and not isinstance(item.get("entry_point"), str):
        raise ValueError("a HumanEval-style code item needs an entry_point")


# -- prompts ----------------------------------------------------------------------------------------------------

def question_text(task: str, item: dict) -> str:
    """The item's question as the file has it (what records show and what pairs results)."""
    if task == "code":
        text = item.get("prompt") if "test_list" not in item else item.get("text") or item.get("prompt")
    else:
        text = item.get("question") or item.get("problem")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a {task} item needs a non-empty question (fields {sorted(item)})")
    return text


def choice_options(item: dict) -> list[str]:
    options = item.get("choices") or item.get("options")
    if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"a choice item needs 2 to {len(LETTERS)} options")
    return [str(option) for option in options]


def loglik_prompt(item: dict) -> str:
    """A choice item scored by loglikelihood (`--mc-scoring loglik`): the raw prompt each option continues, as
    lm-eval's ARC prompts it (no chat template, no options listed: each is scored as the answer itself)."""
    return f"Question: {question_text('choice', item)}\nAnswer:"


def loglik_continuations(item: dict) -> list[str]:
    """Each option as the answer's text, after the space that follows "Answer:" (lm-eval's target delimiter)."""
    return [f" {option}" for option in choice_options(item)]


def loglik_score(item: dict, options: list[dict]) -> Score:
    """The option with the highest loglikelihood (the sum of its tokens' logprobs, lm-eval's `acc`; each entry of
    `options` has its `logprob`) is the model's choice."""
    best = max(range(len(options)), key=lambda i: options[i]["logprob"])
    predicted = LETTERS[best]
    return Score(predicted == gold_letter(item), gold_text("choice", item), predicted)


def prompt_for(task: str, item: dict) -> str:
    """The user message sent for an item: its question and the task's instruction."""
    question = question_text(task, item)
    if task == "maths":
        return f"{question}\n{MATHS_INSTRUCTION}"
    if task == "choice":
        lines = [f"{LETTERS[i]}. {option}" for i, option in enumerate(choice_options(item))]
        return "\n".join([question, *lines, CHOICE_INSTRUCTION])
    if task == "code":
        if "test_list" in item:  # MBPP: the description, and one test to show the function's name and signature
            return f"{question}\nYour code should pass this test:\n{item['test_list'][0]}\n{CODE_INSTRUCTION}"
        return f"Complete this Python function.\n```python\n{question}```\n{CODE_INSTRUCTION}"
    return question


# -- knowledge --------------------------------------------------------------------------------------------------

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


# -- maths ------------------------------------------------------------------------------------------------------

# A number as people write it: optional sign and currency, thousands groups or plain digits, optional decimals.
# The minus counts only when it does not follow a word or digit, so "10-5" reads as 10 and 5, not 10 and -5.
_NUMBER = re.compile(r"(?<![\w.])(-)?(?:\$\s?)?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_BOXED = re.compile(r"\\boxed\s*\{")


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


def parse_number(text: str) -> Decimal | None:
    """The first number in `text` as a Decimal, or None."""
    numbers = find_numbers(text)
    return numbers[0] if numbers else None


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
    """The model's final number: from the last \\boxed{} if it holds a number, else the last number written."""
    boxed = last_boxed(reply)
    if boxed is not None:
        numbers = find_numbers(boxed)
        if numbers:
            return numbers[-1]
    numbers = find_numbers(reply)
    return numbers[-1] if numbers else None


def gold_number(item: dict) -> Decimal:
    """The number after `####` in a GSM8K solution, or an AIME item's integer answer."""
    answer = item.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool):
        return Decimal(answer)
    if isinstance(answer, str):
        _, sep, tail = answer.rpartition("####")
        value = parse_number(tail if sep else answer) if sep or _is_integer_answer(answer) else None
        if value is not None:
            return value
    raise ValueError(f"a maths item needs an answer ending in #### <number> or an integer, got {answer!r}"[:200])


def _number_text(value: Decimal) -> str:
    """18.0 → "18", 2.50 → "2.5": the value, without the trailing zeros that do not change it."""
    return format(value.normalize(), "f")


# -- multiple choice --------------------------------------------------------------------------------------------

def gold_letter(item: dict) -> str:
    answer = item.get("answer")
    options = choice_options(item)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return LETTERS[answer]  # an index, as some data sets give it
    if isinstance(answer, str) and answer.strip().upper() in LETTERS[:len(options)]:
        return answer.strip().upper()
    raise ValueError(f"a choice item's answer must be a letter A-{LETTERS[len(options) - 1]}, got {answer!r}")


def extract_letter(reply: str, options: list[str]) -> str | None:
    """The one option letter the reply commits to, or None (no letter, or two letters with nothing to choose)."""
    valid = LETTERS[:len(options)]
    letter = f"[{valid}]"
    # An explicit answer: the last one counts ("A is tempting, but the answer is C"), unless it hedges ("the
    # answer is A or B").
    explicit = list(re.finditer(rf"\\boxed\s*\{{\s*\(?({letter})\)?\s*\}}"
                                rf"|(?i:answer|option|choice)\s*(?i:is|:)?\s*\**\(?({letter})\)?(?!\w)", reply))
    if explicit:
        last = explicit[-1]
        if re.match(rf"\)?\s*(?:or|and|/|,)\s*\(?{letter}(?!\w)", reply[last.end():]):
            return None
        return last.group(1) or last.group(2)
    # Every capital letter standing alone: "B", "(B)", "B.", "B)". "A" or "I" before a lower-case word is an
    # article or a pronoun ("A cat", "I think"), unless the word joins letters ("A or B").
    letters = set()
    for match in re.finditer(rf"(?<![\w'])({letter})(?![\w'])", reply):
        if match.group(1) in "AI" and re.match(r"\s+(?!or\b|and\b)[a-z]", reply[match.end():]):
            continue
        letters.add(match.group(1))
    if len(letters) == 1:
        return letters.pop()
    if letters:
        return None
    # No letter at all: a reply that quotes exactly one option's text chose it.
    quoted = [valid[i] for i, option in enumerate(options) if option.strip() and contains_answer(reply, option)]
    return quoted[0] if len(quoted) == 1 else None


# -- scoring ----------------------------------------------------------------------------------------------------

def gold_text(task: str, item: dict) -> str:
    """The expected answer, for display and the records."""
    if task == "knowledge":
        answers = item.get("answers")
        if not isinstance(answers, list) or not answers:
            raise ValueError("a knowledge item needs a non-empty answers list")
        return " | ".join(map(str, answers))
    if task == "maths":
        return _number_text(gold_number(item))
    if task == "choice":
        return gold_letter(item)
    if task == "code":
        tests = item.get("test_list") or item.get("test")
        if not tests:
            raise ValueError("a code item needs test (HumanEval) or test_list (MBPP)")
        return "passes the tests"
    raise ValueError(f"unknown task {task!r}")


CodeRunner = Callable[[str, float], tuple[bool, str]]  # (program, timeout) -> (passed, verdict)


def score(task: str, item: dict, reply: str, run_code: CodeRunner | None = None, timeout: float = 10.0) -> Score:
    """Score one reply against one item. Code needs `run_code` (relat_eval.sandbox.run_program)."""
    gold = gold_text(task, item)
    if task == "knowledge":
        return Score(knowledge_correct(reply, item["answers"]), gold, None)
    if task == "maths":
        predicted = extract_answer_number(reply)
        correct = predicted is not None and predicted == gold_number(item)
        return Score(correct, gold, None if predicted is None else _number_text(predicted))
    if task == "choice":
        letter = extract_letter(reply, choice_options(item))
        return Score(letter == gold, gold, letter)
    if task == "code":
        if run_code is None:
            raise ValueError("scoring code needs a sandbox")
        passed, verdict = run_code(code_program(item, reply), timeout)
        return Score(passed, gold, verdict)
    raise ValueError(f"unknown task {task!r}")


# -- code -------------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(reply: str) -> str:
    """The last fenced block marked python (or unmarked), else the whole reply; an unclosed block (the reply hit
    max_tokens) counts up to the end."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(reply)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3", "")]
    return python[-1] if python else reply


def code_program(item: dict, reply: str) -> str:
    """The program that runs: the solution, the tests, and the call that checks it."""
    solution = extract_code(reply)
    if "test_list" in item:
        setup = item.get("test_setup_code") or ""
        return "\n".join([setup, solution, "", *item["test_list"], ""])
    entry_point = item["entry_point"]
    if not re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", solution, flags=re.MULTILINE):
        solution = item["prompt"] + solution  # a completion of the prompt's body, HumanEval's own format
    elif item["prompt"].lstrip().startswith(("import", "from")):
        # A whole function: keep the prompt's imports, which a model often leaves out.
        imports = [line for line in item["prompt"].splitlines() if line.startswith(("import ", "from "))]
        solution = "\n".join(imports) + "\n" + solution
    return "\n".join([solution, "", item["test"], "", f"check({entry_point})", ""])
