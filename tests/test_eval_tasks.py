"""relat eval's task formats and scorers (relat_eval.tasks) and the code sandbox (relat_eval.sandbox); no model.

Each scorer is checked on replies known to be right and replies known to be wrong; the sandbox on programs that
pass, fail, raise, hang, fork, eat memory, flood their output or reach for the network.
"""

from __future__ import annotations

import json
import socket
from decimal import Decimal
from pathlib import Path

import pytest
from relat_eval import sandbox, tasks
from relat_eval.sandbox import run_program

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "bench" / "data"


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


# -- detection and prompts --------------------------------------------------------------------------------------

def test_detect_task_from_fields():
    assert tasks.detect_task({"question": "Q?", "answers": ["blue"]}) == "knowledge"
    assert tasks.detect_task({"question": "Q?", "answer": "steps\n#### 4"}) == "maths"
    assert tasks.detect_task({"problem": "Find n.", "answer": 204}) == "maths"  # AIME
    assert tasks.detect_task({"problem": "Find n.", "answer": "204"}) == "maths"
    assert tasks.detect_task({"question": "Q?", "choices": ["a", "b"], "answer": "B"}) == "choice"
    assert tasks.detect_task({"prompt": "def f():\n", "test": "def check(c): pass", "entry_point": "f"}) == "code"
    assert tasks.detect_task({"text": "Write f.", "test_list": ["assert f() == 1"]}) == "code"
    for unknown in ({"question": "Q?"}, {"question": "Q?", "answer": "blue"}, {"problem": "P", "answer": ""}):
        with pytest.raises(ValueError, match="cannot tell the task"):
            tasks.detect_task(unknown)


def test_check_item_names_what_is_missing():
    with pytest.raises(ValueError, match="answer must be a letter"):
        tasks.check_item("choice", {"question": "Q?", "choices": ["a", "b"], "answer": "C"})
    with pytest.raises(ValueError, match="non-empty question"):
        tasks.check_item("knowledge", {"question": " ", "answers": ["x"]})
    with pytest.raises(ValueError, match="answers list"):
        tasks.check_item("knowledge", {"question": "Q?", "answers": []})


def test_prompts_carry_the_task_instruction():
    choice = {"question": "Which is red?", "choices": ["sky", "blood", "grass"], "answer": "B"}
    assert tasks.prompt_for("choice", choice) == ("Which is red?\nA. sky\nB. blood\nC. grass\n"
                                                  + tasks.CHOICE_INSTRUCTION)
    assert tasks.prompt_for("maths", {"question": "2+2?", "answer": "#### 4"}).endswith(tasks.MATHS_INSTRUCTION)
    assert tasks.prompt_for("knowledge", {"question": "Q?", "answers": ["a"]}) == "Q?"
    humaneval = {"prompt": "def f(x):\n    \"\"\"Double x.\"\"\"\n", "test": "", "entry_point": "f"}
    assert "def f(x):" in tasks.prompt_for("code", humaneval)
    mbpp = {"text": "Write f.", "test_list": ["assert f(1) == 2", "assert f(2) == 4"]}
    assert "assert f(1) == 2" in tasks.prompt_for("code", mbpp) and "f(2)" not in tasks.prompt_for("code", mbpp)


# -- knowledge --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, answers, expected", [
    ("A spider has 8 legs.", ["8", "eight"], True),
    ("A spider has 18 legs.", ["8"], False),
    ("Eight legs.", ["8", "eight"], True),
    ("The symbol is Au.", ["Au"], True),
    ("Gold is found in Australia.", ["Au"], False),
    ("It is the name of an element", ["Na"], False),
    ("The mitochondria.", ["mitochondri"], True),  # longer answers match inside words: a stem is enough
    ("It boils at 1000 degrees", ["100"], False),
    ("Water boils at 100°C.", ["100"], True),  # a short answer beside a symbol is still a whole word
    ("Sodium's symbol is NA (natrium)", ["Na"], True),
    ("Leonardo da Vinci painted it", ["leonardo"], True),
    ("", ["blue"], False),
])
def test_knowledge(reply, answers, expected):
    item = {"question": "Q?", "answers": answers}
    assert tasks.score("knowledge", item, reply).correct is expected


# -- maths ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The answer is 18.", ["18"]),
    ("1,2,3", ["1", "2", "3"]),  # digits between commas are no thousands group
    ("She makes $1,234.50 a week", ["1234.50"]),
    ("It costs $ 7 and then -3 degrees", ["7", "-3"]),
    ("10-5 = 5", ["10", "5", "5"]),
    ("about .5 of it, 2.0 left", ["0.5", "2.0"]),
    ("no digits here", []),
])
def test_find_numbers(text, expected):
    assert tasks.find_numbers(text) == [Decimal(e) for e in expected]


GSM8K = {"question": "Q?", "answer": "9 * 2 = <<9*2=18>>18\n#### 18"}


@pytest.mark.parametrize("reply, correct, predicted", [
    ("So the answer is \\boxed{18.0}.", True, "18"),
    ("9 * 2 = 18 eggs, so she sells 18.00 dollars", True, "18"),
    ("\\boxed{18} is wrong, it is \\boxed{20}", False, "20"),  # the last box counts
    ("\\boxed{\\frac{36}{2}} hmm 17", False, "2"),  # a box's last number, not evaluated
    ("18 eggs, so 36 dollars", False, "36"),
    ("She sells \\boxed{18", True, "18"),  # unclosed at max_tokens: what there is
    ("no number", False, None),
    ("\\boxed{x} so 18", True, "18"),  # a box without a number: the reply's last number
])
def test_maths_gsm8k(reply, correct, predicted):
    score = tasks.score("maths", GSM8K, reply)
    assert (score.correct, score.predicted, score.gold) == (correct, predicted, "18")


def test_maths_negative_and_decimal_answers():
    assert tasks.score("maths", {"question": "Q", "answer": "#### -5"}, "It drops to -5 degrees.").correct
    assert tasks.score("maths", {"question": "Q", "answer": "#### -12.5"}, "\\boxed{-12.50}").correct
    assert not tasks.score("maths", {"question": "Q", "answer": "#### -5"}, "It is 5.").correct


def test_maths_aime_and_gold_forms():
    assert tasks.score("maths", {"problem": "P", "answer": 204}, "Thus m + n = \\boxed{204}").correct
    assert not tasks.score("maths", {"problem": "P", "answer": "204"}, "It is 240.").correct
    assert tasks.gold_text("maths", {"question": "Q", "answer": "#### 1,000"}) == "1000"
    assert tasks.gold_text("maths", {"question": "Q", "answer": "#### 2.50"}) == "2.5"
    with pytest.raises(ValueError):
        tasks.gold_text("maths", {"question": "Q", "answer": "no marker"})


# -- multiple choice --------------------------------------------------------------------------------------------

CHOICE = {"question": "Which planet is red?", "choices": ["Venus", "Mars", "Jupiter", "Saturn"], "answer": "B"}


@pytest.mark.parametrize("reply, predicted", [
    ("B", "B"),
    ("B. Mars", "B"),
    ("(B) Mars is red.", "B"),
    ("The answer is B.", "B"),
    ("Answer: (B)", "B"),
    ("\\boxed{B}", "B"),
    ("A is tempting, but the answer is B.", "B"),  # the explicit answer wins over a mention
    ("A planet's colour comes from its soil: B.", "B"),  # "A" as an article is no letter
    ("Mars, the red planet.", "B"),  # no letter: the one option quoted
    ("A or B", None),  # two letters: hedging scores nothing
    ("The answer is A or B.", None),
    ("B and C are both possible", None),
    ("A. Venus", "A"),
    ("I do not know.", None),
    ("Venus or Mars", None),  # two options quoted
])
def test_choice_letter(reply, predicted):
    score = tasks.score("choice", CHOICE, reply)
    assert score.predicted == predicted
    assert score.correct is (predicted == "B")


def test_choice_answer_as_index_and_five_options():
    item = {"question": "Q?", "options": ["a", "b", "c", "d", "e"], "answer": 4}
    assert tasks.gold_text("choice", item) == "E"
    assert tasks.score("choice", item, "E").correct
    assert not tasks.score("choice", CHOICE, "E").correct  # not an option of a four-option item


# -- code -------------------------------------------------------------------------------------------------------

HUMANEVAL = {
    "prompt": "def double(x: int) -> int:\n    \"\"\"Return twice x.\"\"\"\n",
    "test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-1) == -2\n",
    "entry_point": "double",
}


def fenced(code: str) -> str:
    return f"Here it is:\n```python\n{code}\n```\nDone."


def test_extract_code_takes_the_last_python_block():
    reply = "```python\nwrong = 1\n```\ntext\n```text\nnot code\n```\n```python\nright = 2\n```"
    assert tasks.extract_code(reply) == "right = 2\n"
    assert tasks.extract_code("```python\ncut = 3") == "cut = 3"  # unclosed at max_tokens
    assert tasks.extract_code("x = 1") == "x = 1"  # no fence: the reply itself


@pytest.mark.parametrize("reply, correct", [
    (fenced("def double(x: int) -> int:\n    return 2 * x"), True),
    (fenced("    return x + x"), True),  # a body: it continues the prompt, as HumanEval completions do
    (fenced("def double(x):\n    return x + 2"), False),  # wrong for -1
    (fenced("def double(x):\n    raise ValueError('no')"), False),
    ("I cannot write code.", False),
])
def test_code_humaneval(reply, correct):
    assert tasks.score("code", HUMANEVAL, reply, run_program, timeout=10).correct is correct


def test_code_mbpp():
    item = {"text": "Write inc(x).", "test_list": ["assert inc(1) == 2", "assert inc(-1) == 0"]}
    assert tasks.score("code", item, fenced("def inc(x):\n    return x + 1"), run_program).correct
    assert not tasks.score("code", item, fenced("def inc(x):\n    return x"), run_program).correct


def test_code_needs_a_sandbox():
    with pytest.raises(ValueError, match="sandbox"):
        tasks.score("code", HUMANEVAL, fenced("def double(x): return 2 * x"))


def test_sandbox_verdicts_for_failures():
    assert run_program("assert 1 + 1 == 2\n") == (True, "passed")
    assert run_program("assert 1 == 2, 'nope'\n") == (False, "AssertionError: nope")
    assert run_program("raise ValueError('boom')\n") == (False, "ValueError: boom")
    assert run_program("import sys\nsys.exit(3)\n") == (False, "exit status 3")


def test_sandbox_a_hanging_program_times_out():
    assert run_program("while True:\n    pass\n", timeout=1) == (False, "timeout")
    assert run_program("import time\ntime.sleep(60)\n", timeout=1) == (False, "timeout")


def test_sandbox_refuses_new_processes():
    passed, verdict = run_program("import os\nos.fork()\n")
    assert not passed and "Resource temporarily unavailable" in verdict
    passed, verdict = run_program("import subprocess\nsubprocess.run(['true'])\n")
    assert not passed


def test_sandbox_limits_memory_and_output():
    assert run_program("block = bytearray(8 * 2**30)\n", memory_mb=256) == (False, "MemoryError")
    passed, verdict = run_program("while True:\n    print('x' * 4096)\n", timeout=20)
    assert not passed and "File too large" in verdict


def test_sandbox_cannot_reach_the_network():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        passed, verdict = run_program(program)
    finally:
        listener.close()
    assert not passed
    if sandbox.isolation() == "namespace":  # the loopback of a fresh network namespace is down
        assert "Network is unreachable" in verdict
    else:
        assert "network access is disabled" in verdict


def test_sandbox_runs_in_a_fresh_directory_that_is_removed():
    passed, verdict = run_program("import os\nopen('left.txt', 'w').write(os.getcwd())\nprint(os.getcwd())\n"
                                  "assert os.listdir('.') and 'relat-eval-' in os.getcwd()\n")
    assert (passed, verdict) == (True, "passed")


# -- the project's data files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, task, least", [
    ("knowledge_extra.jsonl", "knowledge", 40), ("knowledge_kinds.jsonl", "knowledge", 150),
    ("knowledge_fresh.jsonl", "knowledge", 150),
    ("maths_examples.jsonl", "maths", 10), ("choice.jsonl", "choice", 40), ("code_tasks.jsonl", "code", 20),
    ("code_mbpp_examples.jsonl", "code", 5), ("knowledge_dev.jsonl", "knowledge", 76),
    ("gsm8k_test_dev.jsonl", "maths", 1000), ("aime24.jsonl", "maths", 30),
])
def test_data_files_are_well_formed(name, task, least):
    items = read(name)
    assert len(items) >= least
    assert len({tasks.question_text(task, item) for item in items}) == len(items)
    for item in items:
        assert tasks.detect_task(item) == task
        tasks.check_item(task, item)
        if task == "knowledge":  # echoing the question never scores
            assert not tasks.score(task, item, item["question"]).correct, item


def test_knowledge_files_keep_their_fields_and_repeat_no_knowledge_dev_question():
    assert all(set(item) == {"question", "answers"} for item in read("knowledge_extra.jsonl"))
    for name in ("knowledge_kinds.jsonl", "knowledge_fresh.jsonl"):
        assert all(set(item) == {"question", "answers", "kind"} for item in read(name))
    dev = {item["question"].casefold() for item in read("knowledge_dev.jsonl")}
    ours = [{item["question"].casefold() for item in read(name)}
            for name in ("knowledge_extra.jsonl", "knowledge_kinds.jsonl", "knowledge_fresh.jsonl", "choice.jsonl")]
    assert len(dev) == 76 and not dev & set.union(*ours)
    assert not ours[2] & (ours[0] | ours[1] | ours[3])  # knowledge_fresh repeats none of the others


def test_choice_gold_letters_are_balanced():
    letters = [item["answer"] for item in read("choice.jsonl")]
    assert {letters.count(letter) for letter in "ABCD"} == {len(letters) // 4}


def test_code_tasks_reference_solutions_pass_and_a_wrong_one_fails():
    for item in read("code_tasks.jsonl"):
        assert tasks.score("code", item, fenced(item["prompt"] + item["canonical_solution"]), run_program).correct
        assert not tasks.score("code", item, "    return None\n", run_program).correct, item["task_id"]
    for item in read("code_mbpp_examples.jsonl"):
        assert tasks.score("code", item, fenced(item["code"]), run_program).correct, item["task_id"]
