"""Multi-agent collaboration: the teams, their role prompts and the answer formats (no tensors here).

One model plays every role (LatentMAS, arXiv 2511.20639; repository Gen-Verse/LatentMAS). Each agent is
a user turn built from the request's own messages: the request's history stays, and its last user message (the
question) becomes the agent's instruction around the question. How the agents talk is the method's business
(relat_core/engine/thinking.py and answering.py):

- direct (TextMAS): each agent writes text from a fresh prompt; every later agent that reads context finds the
  earlier agents' text in its turn, labelled ("[Planner]: ..."); the last agent answers from all of it;
- latent (LatentMAS): one KV cache carries through the agents; each agent but the last prefills its turn on top
  of it and adds latent positions; the last prefills its turn on the whole cache and answers;
- relat: as latent, with an adapter trained to rebuild the question from that whole working memory.

The prompts are the project's own; a JSON file (`relat serve --agent-prompts`) can replace any of them:

    {"roles": {"planner": "... {question} ..."}, "formats": {"boxed": "..."}}

Every role prompt must hold `{question}` once; format instructions are appended to the last agent's turn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .params import ANSWER_FORMATS, TTTParams


@dataclass(frozen=True)
class Role:
    name: str  # its key in a prompts file
    label: str  # how its text is labelled for the agents after it (TextMAS) and named in the trace
    reads_context: bool = True  # TextMAS: whether the earlier agents' text is in its turn


TEAMS: dict[str, tuple[Role, ...]] = {
    "sequential": (Role("planner", "Planner"), Role("critic", "Critic"), Role("refiner", "Refiner"),
                   Role("judger", "Judger")),
    # The domain agents solve on their own; only the summariser reads them (LatentMAS's hierarchical setting).
    "hierarchical": (Role("maths", "Maths agent", reads_context=False),
                     Role("science", "Science agent", reads_context=False),
                     Role("code", "Code agent", reads_context=False), Role("summariser", "Summariser")),
}

QUESTION = "{question}"

DEFAULT_ROLE_PROMPTS: dict[str, str] = {
    "planner": "You are the planner of a small team. Question: {question}\n"
               "Write a short step-by-step plan for solving it, a few bullet points. Do not solve it yet.",
    "critic": "You are the critic of a small team. The planner's plan is above. Question: {question}\n"
              "Check the plan: say which steps are wrong or missing and how to fix them.",
    "refiner": "You are the refiner of a small team. A plan and a critique of it are above. Question: {question}\n"
               "Write the corrected plan, short and complete.",
    "judger": "You are the judge of a small team. The team's work is above; use what helps and ignore what is "
              "wrong. Question: {question}\nSolve it and give the final answer.",
    "maths": "You are a mathematician. Question: {question}\nReason step by step and give your answer.",
    "science": "You are a scientist. Question: {question}\nReason step by step and give your answer.",
    "code": "You are a programmer. Question: {question}\nReason step by step, with code if it helps, and give "
            "your answer.",
    "summariser": "You are the summariser of a small team. Three experts' answers are above. Question: {question}\n"
                  "Weigh their answers and give the final answer.",
}

DEFAULT_FORMAT_INSTRUCTIONS: dict[str, str] = {
    "text": "",
    "boxed": "Put the final answer inside \\boxed{}.",
    "choice": "Answer with the letter of the correct option.",
    "code": "Put the complete solution in one fenced python code block.",
}

CONTEXT_HEADER = "Notes from the agents before you:"

# "auto": lettered options (two or more of "A)", "(B)", "C." at a line start) make a multiple-choice question;
# asking for python, a function or a program makes a code question; anything else gets no format instruction.
_CHOICES = re.compile(r"(?m)^\s*\(?([A-E])[).:]\s")
_CODE = re.compile(r"(?i)\b(python|def |function|program|implement)\b")


def resolve_answer_format(ttt: TTTParams, question: str) -> str:
    """The format the answer is asked for: the request's, or for "auto" one read off the question (agents only:
    a single model under "auto" gets the question as it was sent)."""
    if ttt.answer_format != "auto":
        return ttt.answer_format
    if ttt.agents == "single":
        return "text"
    if len(set(_CHOICES.findall(question))) >= 2:
        return "choice"
    if _CODE.search(question):
        return "code"
    return "text"


@dataclass(frozen=True)
class AgentPrompts:
    roles: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ROLE_PROMPTS))
    formats: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FORMAT_INSTRUCTIONS))

    def __post_init__(self) -> None:
        for name, prompt in self.roles.items():
            if name not in DEFAULT_ROLE_PROMPTS:
                raise ValueError(f"unknown role {name!r}; the roles are {', '.join(DEFAULT_ROLE_PROMPTS)}")
            if not isinstance(prompt, str) or prompt.count(QUESTION) != 1:
                raise ValueError(f"the prompt of role {name!r} must be a string holding {QUESTION} exactly once")
        for name, instruction in self.formats.items():
            if name not in DEFAULT_FORMAT_INSTRUCTIONS:
                formats = ", ".join(f for f in ANSWER_FORMATS if f != "auto")
                raise ValueError(f"unknown answer format {name!r}; the formats are {formats}")
            if not isinstance(instruction, str):
                raise ValueError(f"the instruction of format {name!r} must be a string")

    @classmethod
    def load(cls, path: str | Path) -> AgentPrompts:
        """The defaults with the file's prompts in their place (ValueError names what is wrong)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read agent prompts from {path}: {error}") from None
        if not isinstance(data, dict) or set(data) - {"roles", "formats"}:
            raise ValueError(f"{path}: expected an object with \"roles\" and/or \"formats\"")
        roles, formats = data.get("roles", {}), data.get("formats", {})
        if not isinstance(roles, dict) or not isinstance(formats, dict):
            raise ValueError(f"{path}: \"roles\" and \"formats\" must be objects")
        return cls({**DEFAULT_ROLE_PROMPTS, **roles}, {**DEFAULT_FORMAT_INSTRUCTIONS, **formats})

    def turn(self, role: Role, question: str, context: str = "", answer_format: str = "text") -> str:
        """The agent's user turn: earlier agents' text (TextMAS), its role prompt around the question, and for the
        last agent the answer format's instruction."""
        text = self.roles[role.name].replace(QUESTION, question)  # not str.format: prompts hold braces (\\boxed{})
        if context:
            text = f"{CONTEXT_HEADER}\n{context}\n\n{text}"
        instruction = self.formats[answer_format]
        return f"{text}\n{instruction}" if instruction else text


def with_format(question: str, answer_format: str, prompts: AgentPrompts) -> str:
    """A single model's question with the answer format's instruction appended (none for "text")."""
    instruction = prompts.formats[answer_format]
    return f"{question}\n{instruction}" if instruction else question


def labelled(role: Role, text: str) -> str:
    """An agent's text as the agents after it read it (TextMAS)."""
    return f"[{role.label}]: {text.strip()}"
