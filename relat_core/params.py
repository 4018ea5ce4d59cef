"""Request parameters of the engine, validated once when a request is built.

Every field that the ReLAT paper (arXiv 2606.06252) leaves open is a parameter here. A field's default is the plain
method (the answer after the thought, no guidance, no contrast); the engine's defaults per model size, chosen by
measurement (bench/RESULTS.md, sections 3 and 7), are `relat_core.engine.default_ttt_params`. `InvalidParameter`
names the offending field so that the server can answer with OpenAI's `param`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

Method = Literal["direct", "latent", "relat"]
Mapping = Literal["norm", "realign", "none", "soft"]
FollowUp = Literal["bridge", "restate"]
AnswerContext = Literal["thought", "question"]
Agents = Literal["single", "sequential", "hierarchical"]
AnswerFormat = Literal["auto", "text", "boxed", "choice", "code"]

METHODS: tuple[str, ...] = ("direct", "latent", "relat")
MAPPINGS: tuple[str, ...] = ("norm", "realign", "none", "soft")
FOLLOW_UPS: tuple[str, ...] = ("bridge", "restate")
ANSWER_CONTEXTS: tuple[str, ...] = ("thought", "question")
AGENTS: tuple[str, ...] = ("single", "sequential", "hierarchical")
ANSWER_FORMATS: tuple[str, ...] = ("auto", "text", "boxed", "choice", "code")
MAX_AGENT_TOKENS = 4096
MAX_GUIDANCE = 10.0  # past this the extrapolated logits are noise; a bound keeps a typo from being a silent garble
# Linear layers of a Llama/Qwen decoder block that can carry the adapter.
ATTENTION_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS: tuple[str, ...] = ATTENTION_TARGETS + MLP_TARGETS

RECONSTRUCTION_INSTRUCTION = "Repeat the question you were asked, word for word."


class InvalidParameter(ValueError):
    """A request parameter is out of range; `param` names it as the API does."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _require(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise InvalidParameter(param, message)


@dataclass(frozen=True)
class TTTParams:
    """How the latent thought is built and, for `relat`, how the per-request adapter is trained."""

    method: Method = "relat"
    latent_steps: int = 4  # L; the paper uses 16, which hurts small models (bench/RESULTS.md)
    steps: int = 2  # N, AdamW steps on the reconstruction loss; the paper uses 5
    lr: float = 5e-3
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ATTENTION_TARGETS
    adapter_during_answer: bool = False
    # Stop training once the reconstruction loss is at or below this: driving it to ~0 over-fits the adapter to
    # the copy task and breaks answers (../shared/notes/relat-notes.md, section 3).
    stop_loss: float | None = None
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    mapping: Mapping = "norm"
    # mapping "soft": the next latent input is E^T softmax(lm_head(h) / soft_temperature), over the top
    # soft_top_k tokens only when it is set (0: the whole vocabulary); differentiable, and on the embeddings' span.
    soft_temperature: float = 1.0
    soft_top_k: int = 0
    residual_alpha: float = 0.0  # e_t = a*e_{t-1} + (1-a)*f(h_t); 0 is the plain LatentMAS feedback
    follow_up: FollowUp = "restate"  # what separates the latent thought from the answer
    # relat: what the answer is decoded after. "thought": prompt, latent thought, follow-up; "question": the prompt
    # alone, with the adapter on (the thought only trains it). direct and latent ignore it, as they ignore steps.
    answer_context: AnswerContext = "thought"
    # latent, relat: answer logits l_plain + w (l_own - l_plain), l_plain from the base model on the plain prompt,
    # decoded in lockstep as an extra row. 1 is the request's own path (no extra row), 0 is direct.
    guidance: float = 1.0
    # relat: during the final thought each latent input moves by eta (f_adapted - f_base), the adapted and base
    # models' next latents from the same input (the base model as an extra row of the same forward); 0 is off.
    contrastive_eta: float = 0.0
    reconstruction_instruction: str = RECONSTRUCTION_INSTRUCTION
    # Multi-agent collaboration (relat_core/agents.py), independent of the method: "single" is one model answering;
    # "sequential" runs planner, critic, refiner, then a judger that answers; "hierarchical" runs maths, science
    # and code agents, then a summariser. direct: agents write text (TextMAS), each up to agent_max_tokens;
    # latent: they share one KV cache, each adding latent_steps latent positions (LatentMAS); relat: the adapter
    # is trained to rebuild the question from that whole working memory, then the agents run again with it.
    agents: Agents = "single"
    agent_max_tokens: int = 128
    # The answer's format, as an instruction to the final agent (or, set explicitly, to a single model): "boxed"
    # (\boxed{}), "choice" (a letter), "code" (a fenced python block), "text" (none); "auto" picks by the question.
    answer_format: AnswerFormat = "auto"

    def __post_init__(self) -> None:
        _require(self.method in METHODS, "method",
                 f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        _require(_is_int(self.latent_steps) and 0 <= self.latent_steps <= 256, "latent_steps",
                 f"latent_steps must be an integer in [0, 256], got {self.latent_steps!r}")
        _require(_is_int(self.steps) and 0 <= self.steps <= 100, "steps",
                 f"steps must be an integer in [0, 100], got {self.steps!r}")
        _require(_is_number(self.lr) and 0 < self.lr <= 1, "lr", f"lr must be in (0, 1], got {self.lr!r}")
        _require(_is_int(self.rank) and 1 <= self.rank <= 256, "rank",
                 f"rank must be an integer in [1, 256], got {self.rank!r}")
        _require(_is_number(self.alpha) and self.alpha > 0, "alpha", f"alpha must be positive, got {self.alpha!r}")
        _require(isinstance(self.targets, (tuple, list)) and len(self.targets) > 0
                 and all(t in ALL_TARGETS for t in self.targets), "targets",
                 f"targets must be a non-empty subset of {', '.join(ALL_TARGETS)}, got {self.targets!r}")
        _require(self.stop_loss is None or (_is_number(self.stop_loss) and self.stop_loss >= 0), "stop_loss",
                 f"stop_loss must be null or a non-negative number, got {self.stop_loss!r}")
        _require(_is_number(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm",
                 f"max_grad_norm must be positive, got {self.max_grad_norm!r}")
        _require(_is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
                 f"weight_decay must be non-negative, got {self.weight_decay!r}")
        _require(self.mapping in MAPPINGS, "mapping", f"mapping must be one of {', '.join(MAPPINGS)}")
        _require(_is_number(self.soft_temperature) and 0 < self.soft_temperature <= 10, "soft_temperature",
                 f"soft_temperature must be in (0, 10], got {self.soft_temperature!r}")
        _require(_is_int(self.soft_top_k) and self.soft_top_k >= 0, "soft_top_k",
                 f"soft_top_k must be a non-negative integer (0: the whole vocabulary), got {self.soft_top_k!r}")
        _require(self.answer_context in ANSWER_CONTEXTS, "answer_context",
                 f"answer_context must be one of {', '.join(ANSWER_CONTEXTS)}, got {self.answer_context!r}")
        _require(_is_number(self.guidance) and 0 <= self.guidance <= MAX_GUIDANCE, "guidance",
                 f"guidance must be in [0, {MAX_GUIDANCE:g}], got {self.guidance!r}")
        _require(_is_number(self.contrastive_eta) and 0 <= self.contrastive_eta <= MAX_GUIDANCE, "contrastive_eta",
                 f"contrastive_eta must be in [0, {MAX_GUIDANCE:g}], got {self.contrastive_eta!r}")
        _require(_is_number(self.residual_alpha) and 0 <= self.residual_alpha < 1, "residual_alpha",
                 f"residual_alpha must be in [0, 1), got {self.residual_alpha!r}")
        _require(self.follow_up in FOLLOW_UPS, "follow_up", f"follow_up must be one of {', '.join(FOLLOW_UPS)}")
        _require(isinstance(self.reconstruction_instruction, str) and bool(self.reconstruction_instruction.strip()),
                 "reconstruction_instruction",
                 "reconstruction_instruction must not be empty")
        _require(self.agents in AGENTS, "agents", f"agents must be one of {', '.join(AGENTS)}, got {self.agents!r}")
        _require(_is_int(self.agent_max_tokens) and 1 <= self.agent_max_tokens <= MAX_AGENT_TOKENS,
                 "agent_max_tokens",
                 f"agent_max_tokens must be an integer in [1, {MAX_AGENT_TOKENS}], got {self.agent_max_tokens!r}")
        _require(self.answer_format in ANSWER_FORMATS, "answer_format",
                 f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {self.answer_format!r}")
        if self.method == "relat":
            _require(self.latent_steps >= 1, "latent_steps", "relat needs at least one latent step")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(self.targets)))  # hashable, without repeats

    def replace(self, **changes: object) -> TTTParams:
        return dataclasses.replace(self, **changes)

    @property
    def trains(self) -> bool:
        return self.method == "relat" and self.steps > 0

    @property
    def guided(self) -> bool:
        """Whether the answer is decoded with a plain (direct) row beside it."""
        return self.method != "direct" and self.guidance != 1.0


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters, with OpenAI's meaning: temperature 0 is greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # decode past end-of-sequence tokens (vLLM's extension): fixed-length benchmarks

    def __post_init__(self) -> None:
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        _require(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
                 f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        _require(_is_number(self.temperature) and 0 <= self.temperature <= 2, "temperature",
                 f"temperature must be in [0, 2], got {self.temperature!r}")
        _require(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p",
                 f"top_p must be in (0, 1], got {self.top_p!r}")
        _require(_is_int(self.top_k) and self.top_k >= 0, "top_k",
                 f"top_k must be a non-negative integer, got {self.top_k!r}")
        _require(self.seed is None or _is_int(self.seed), "seed", f"seed must be an integer, got {self.seed!r}")
        _require(isinstance(self.stop, (tuple, list)) and len(self.stop) <= 4
                 and all(isinstance(s, str) and s for s in self.stop), "stop",
                 "stop must hold at most 4 non-empty strings")
        _require(isinstance(self.ignore_eos, bool), "ignore_eos", "ignore_eos must be a boolean")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
