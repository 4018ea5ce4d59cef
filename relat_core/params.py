"""Request parameters of the engine, validated once when a request is built.

Every field that the ReLAT paper (arXiv 2606.06252) leaves open is a parameter here. A field's default is the plain
method (the answer after the thought, no guidance, no contrast); the engine's defaults per model size, chosen by
measurement (bench/RESULTS.md, sections 3 and 7), are `relat_core.engine.defaults.default_ttt_params`.
`InvalidParameter` names the offending field so that the server can answer with OpenAI's `param`. The numeric
ranges are the tables here (`TTT_BOUNDS`, `SAMPLING_BOUNDS`), of `Bound`s (relat_core/bounds.py, re-exported here).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

from .bounds import Bound, is_int

Method = Literal["direct", "latent", "relat"]
Mapping = Literal["norm", "realign", "none", "soft"]
FollowUp = Literal["bridge", "restate"]
AnswerContext = Literal["thought", "question"]
Agents = Literal["single", "sequential", "hierarchical"]
AnswerFormat = Literal["auto", "text", "boxed", "choice", "code"]
# ALL_TARGETS: a Llama/Qwen decoder's linear layers, then Huginn's (relat_core/models/huginn/)
Target = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "Wqkv", "attn.proj", "mlp.fc", "mlp.proj", "adapter"]
ExitCriterion = Literal["none", "kl", "latent-diff", "argmax-stability"]
Objective = Literal["reconstruction", "prompt_lm", "entropy"]
Gate = Literal["none", "fidelity", "confidence", "auto"]

METHODS: tuple[str, ...] = ("direct", "latent", "relat")
MAPPINGS: tuple[str, ...] = ("norm", "realign", "none", "soft")
FOLLOW_UPS: tuple[str, ...] = ("bridge", "restate")
ANSWER_CONTEXTS: tuple[str, ...] = ("thought", "question")
AGENTS: tuple[str, ...] = ("single", "sequential", "hierarchical")
ANSWER_FORMATS: tuple[str, ...] = ("auto", "text", "boxed", "choice", "code")
EXIT_CRITERIA: tuple[str, ...] = ("none", "kl", "latent-diff", "argmax-stability")
OBJECTIVES: tuple[str, ...] = ("reconstruction", "prompt_lm", "entropy")
GATES: tuple[str, ...] = ("none", "fidelity", "confidence", "auto")
MAX_AGENT_TOKENS = 4096
MAX_GUIDANCE = 10.0  # past this the extrapolated logits are noise; a bound keeps a typo from being a silent garble
# Linear layers that can carry the adapter, named by the end of their module path: a Llama/Qwen decoder block's,
# then a Huginn sandwich block's (attention: Wqkv and attn.proj; MLP: mlp.fc and mlp.proj) and the recurrence's
# input adapter. A model offers the targets it has (SlotBank.kinds); the engine refuses the others.
ATTENTION_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
HUGINN_ATTENTION_TARGETS: tuple[str, ...] = ("Wqkv", "attn.proj")
HUGINN_TARGETS: tuple[str, ...] = HUGINN_ATTENTION_TARGETS + ("mlp.fc", "mlp.proj", "adapter")
ALL_TARGETS: tuple[str, ...] = ATTENTION_TARGETS + MLP_TARGETS + HUGINN_TARGETS
# Options of recurrent-depth models (Huginn) only: None leaves them to the model's config; set on another model,
# the engine refuses the request naming the option.
RECURRENCE_OPTIONS: tuple[str, ...] = ("num_steps", "init_scale", "exit_criterion", "exit_threshold",
                                       "backprop_depth")
MAX_NUM_STEPS = 1024  # the recurrences a position may run; a server narrows it (max_num_steps)

RECONSTRUCTION_INSTRUCTION = "Repeat the question you were asked, word for word."


class InvalidParameter(ValueError):
    """A request parameter is out of range; `param` names it as the API does."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _require(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise InvalidParameter(param, message)


# The numeric TTT parameters' ranges (the others are enumerations, checked below).
TTT_BOUNDS: dict[str, Bound] = {
    "latent_steps": Bound(0, 256, integer=True),  # a request's L; `relat` needs at least 1 (checked below)
    "steps": Bound(0, 100, integer=True),
    "lr": Bound(0, 1, low_open=True),
    "rank": Bound(1, 256, integer=True),
    "alpha": Bound(0, low_open=True),
    "stop_loss": Bound(0),  # or None: no early stop
    "max_grad_norm": Bound(0, low_open=True),
    "weight_decay": Bound(0),
    "soft_temperature": Bound(0, 10, low_open=True),
    "soft_top_k": Bound(0, integer=True),  # 0: the whole vocabulary
    "residual_alpha": Bound(0, 1, high_open=True),
    "guidance": Bound(0, MAX_GUIDANCE),
    "contrastive_eta": Bound(0, MAX_GUIDANCE),
    "agent_max_tokens": Bound(1, MAX_AGENT_TOKENS, integer=True),
    "num_steps": Bound(1, MAX_NUM_STEPS, integer=True),
    "init_scale": Bound(0, 10),
    "exit_threshold": Bound(0, low_open=True),
    "backprop_depth": Bound(1, MAX_NUM_STEPS, integer=True),
    "backprop_latent_steps": Bound(0, 256, integer=True),
    # The entropy objective's draft: a few answer tokens, decoded once per request (64 keeps it a prefix).
    "entropy_tokens": Bound(1, 64, integer=True),
    # The gate's draft: the first tokens of direct's answer, whose confidence the gate reads (kept as the answer's
    # start when the gate keeps direct).
    "draft_tokens": Bound(1, 64, integer=True),
    "gate_threshold": Bound(),  # any finite number: each gate's signal has its own scale (docs/api.md)
}
# The numeric options that may be None (left to a later default), and so are checked only when set.
OPTIONAL_TTT = ("stop_loss", "gate_threshold", "num_steps", "init_scale", "exit_threshold", "backprop_depth")
SAMPLING_BOUNDS: dict[str, Bound] = {
    "max_tokens": Bound(1, integer=True),
    "n": Bound(1, 128, integer=True),  # answers from the one training and thought; a server narrows it (max_n)
    "temperature": Bound(0, 2),
    "top_p": Bound(0, 1, low_open=True),
    "top_k": Bound(0, integer=True),  # 0 disables top-k
    # What torch's generators take: a seed beyond would fail inside the engine instead of as a 400.
    "seed": Bound(-(2**63), 2**64 - 1, integer=True),
    "top_logprobs": Bound(0, 20, integer=True),  # as OpenAI bounds it
    # Of each prompt token, its logprob and the k likeliest tokens' (vLLM's prompt_logprobs; None: not asked for).
    "prompt_logprobs": Bound(0, 20, integer=True),
    "presence_penalty": Bound(-2, 2),  # OpenAI's ranges
    "frequency_penalty": Bound(-2, 2),
}
LOGIT_BIAS = Bound(-100, 100)  # each value of logit_bias, as OpenAI bounds it
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows


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
    # the copy task and breaks answers (bench/RESULTS.md, section 3).
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
    # relat: take the adapter from the engine's adapter cache when the same training ran before, and cache this
    # one (relat_core/adapter_cache.py); false trains afresh and caches nothing.
    cache: bool = True
    # relat: truncated backpropagation through the latent thought, as recurrent-depth models train: the
    # reconstruction's gradient crosses only the thought's last k latent steps (and what follows them); every
    # position before them is a constant, computed without a graph where the whole batch allows. 0: all of it.
    backprop_latent_steps: int = 0
    # relat: what test-time training minimises (relat_core/engine/objectives.py). "reconstruction": ReLAT's loss,
    # rebuilding the question from the latent thought. The controls the paper compares it with, both without a
    # thought in training: "prompt_lm", the next-token loss of the question's tokens in the prompt (test-time
    # training on the input); "entropy", the mean entropy of the distributions that predict the first
    # entropy_tokens tokens of the base model's greedy draft answer (TENT, arXiv 2006.10726).
    objective: Objective = "reconstruction"
    entropy_tokens: int = 8
    # relat: whether to train at all, decided per request before training (relat_core/engine/gating.py). "none"
    # trains always; "fidelity" trains when the reconstruction loss through the base model's thought (l0, one
    # graph-free forward) is above gate_threshold; "confidence" when the confidence of direct's first draft_tokens
    # tokens (the geometric mean of their probabilities) is below it; "auto" when a linear score over both, fitted
    # on search halves (bench/RESULTS.md), is above it. A request the gate keeps answers as direct does, token for
    # token, its draft the answer's start. None: the gate's own default threshold.
    gate: Gate = "none"
    gate_threshold: float | None = None
    draft_tokens: int = 8
    # With logprobs: each answer token's logprob under the base model on the plain prompt too (TokenLogprob's
    # base_logprob), beside the one it was decoded with; the two show what the thought, adapter and guidance
    # changed. It costs one more decoding row per answer, the plain row guidance decodes (reused when guided;
    # none when the answer is the base model's on the plain prompt, as direct's: its shift is 0).
    logprob_shift: bool = False
    # -- recurrent-depth models (Huginn) only; None: the model's own default --
    # Recurrences of the core block per position (default: the config's mean_recurrence), capped by a server's
    # max_num_steps.
    num_steps: int | None = None
    # The initial latent state's scale: a truncated normal of the init's std times init_scale, drawn from the
    # request's seed and each position's index (so batched equals alone); 0 is a zero state (default 1, as Huginn).
    init_scale: float | None = None
    # Adaptive exit: a position stops iterating once its criterion fires (exit_threshold, default Huginn's), never
    # past num_steps. It applies to the forwards without gradient (the thought answered from, the answer): a
    # training forward runs every position its full num_steps, as Huginn trained.
    exit_criterion: ExitCriterion | None = None
    exit_threshold: float | None = None
    # relat: the reconstruction's gradient flows through each position's last backprop_depth recurrences only
    # (default: the config's mean_backprop_depth), the truncated backpropagation Huginn was trained with.
    backprop_depth: int | None = None

    def __post_init__(self) -> None:
        _require(self.method in METHODS, "method",
                 f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name, bound in TTT_BOUNDS.items():
            value = getattr(self, name)
            _require((name in OPTIONAL_TTT and value is None) or bound.holds(value), name, bound.message(name, value))
        _require(isinstance(self.targets, (tuple, list)) and len(self.targets) > 0
                 and all(t in ALL_TARGETS for t in self.targets), "targets",
                 f"targets must be a non-empty subset of {', '.join(ALL_TARGETS)}, got {self.targets!r}")
        _require(self.mapping in MAPPINGS, "mapping", f"mapping must be one of {', '.join(MAPPINGS)}")
        _require(self.answer_context in ANSWER_CONTEXTS, "answer_context",
                 f"answer_context must be one of {', '.join(ANSWER_CONTEXTS)}, got {self.answer_context!r}")
        _require(self.follow_up in FOLLOW_UPS, "follow_up", f"follow_up must be one of {', '.join(FOLLOW_UPS)}")
        _require(isinstance(self.reconstruction_instruction, str) and bool(self.reconstruction_instruction.strip()),
                 "reconstruction_instruction",
                 "reconstruction_instruction must not be empty")
        _require(self.agents in AGENTS, "agents", f"agents must be one of {', '.join(AGENTS)}, got {self.agents!r}")
        _require(self.answer_format in ANSWER_FORMATS, "answer_format",
                 f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {self.answer_format!r}")
        _require(self.objective in OBJECTIVES, "objective",
                 f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        _require(self.gate in GATES, "gate", f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        _require(isinstance(self.logprob_shift, bool), "logprob_shift", "logprob_shift must be a boolean")
        _require(self.exit_criterion is None or self.exit_criterion in EXIT_CRITERIA, "exit_criterion",
                 f"exit_criterion must be one of {', '.join(EXIT_CRITERIA)}, got {self.exit_criterion!r}")
        _require(self.exit_threshold is None or self.exit_criterion not in (None, "none"), "exit_threshold",
                 "exit_threshold needs an exit_criterion")
        _require(self.exit_threshold is None or self.exit_criterion != "argmax-stability"
                 or float(self.exit_threshold).is_integer(), "exit_threshold",
                 "exit_threshold of argmax-stability counts steps: it must be a whole number")
        if self.method == "relat":
            _require(self.latent_steps >= 1, "latent_steps", "relat needs at least one latent step")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(self.targets)))  # hashable, without repeats

    @property
    def recurrence_options(self) -> dict[str, object]:
        """The recurrent-depth options this request sets (those left None are not)."""
        return {name: getattr(self, name) for name in RECURRENCE_OPTIONS if getattr(self, name) is not None}

    def replace(self, **changes: object) -> TTTParams:
        return dataclasses.replace(self, **changes)

    @property
    def trains(self) -> bool:
        return self.method == "relat" and self.steps > 0

    @property
    def adapter_answers(self) -> bool:
        """Whether the answer runs through the trained adapter: relat that trains, with adapter_during_answer, or
        answering from the question (the adapter is on whatever adapter_during_answer says: off, that would be
        direct). A request whose update is abandoned at run time (the trace's `aborted`) answers without it."""
        return self.trains and (self.adapter_during_answer or self.answer_context == "question")

    def as_applied(self) -> dict[str, object]:
        """Every option as it applies to a request (the trace's `options`, relat eval's options table): the fields,
        `targets` as a list, and adapter_during_answer as applied (`adapter_answers`), not as asked."""
        return {**dataclasses.asdict(self), "targets": list(self.targets),
                "adapter_during_answer": self.adapter_answers}

    @property
    def guided(self) -> bool:
        """Whether the answer is decoded with a plain (direct) row beside it."""
        return self.method != "direct" and self.guidance != 1.0


@dataclass(frozen=True)
class StructuredOutput:
    """What an answer must be (structured outputs, relat_core/grammar.py): JSON valid against `json_schema` (a JSON
    schema, serialised), or any JSON object (`json_object`). `field` names the request field it came from, so that
    an error names it too ("response_format", "tool_choice")."""

    json_schema: str | None = None
    json_object: bool = False
    field: str = "response_format"

    def __post_init__(self) -> None:
        _require((self.json_schema is None) != (not self.json_object), self.field,
                 "a structured output is a JSON schema or any JSON object, not both")

    @classmethod
    def from_schema(cls, schema: dict, field: str = "response_format") -> StructuredOutput:
        """A schema given as a dict, serialised canonically (one compiled grammar per distinct schema)."""
        return cls(json_schema=json.dumps(schema, sort_keys=True, separators=(",", ":")), field=field)


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
    # Answers sampled from the one training and thought, each drawing from its own generator: answer k from
    # seed + k (answer 0 is the answer of the same request with n 1), as OpenAI's n.
    n: int = 1
    # OpenAI's penalties, per answer over the tokens it has generated: each logit falls by frequency_penalty per
    # time its token was generated, and by presence_penalty once if it was; logit_bias adds to chosen tokens'
    # logits (token id -> -100..100). Applied before temperature, top-k and top-p, and before greedy's argmax.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Each answer token's logprob, and the top_logprobs likeliest tokens' at its position (OpenAI's logprobs). They
    # are read from the distribution the request decoded from, its adapter and guidance included, before penalties,
    # biases and temperature: vLLM's default ("raw") logprobs mode.
    logprobs: bool = False
    top_logprobs: int = 0
    # Each prompt token's logprob (the first has none) and the prompt_logprobs likeliest tokens' at its position,
    # as vLLM's prompt_logprobs: from the forward that reads the prompt on the way to the answer (relat's adapted
    # model where it trained; the request's own row, without guidance's mix). None: not asked for. max_tokens may
    # be 0 in the engine: the request reads its prompt and answers nothing (finish_reason "length"), as OpenAI's
    # legacy completions allow with echo; of the endpoints, only /v1/completions offers it.
    prompt_logprobs: int | None = None
    # The answer constrained to a JSON schema or to any JSON object (OpenAI's response_format), by a grammar's token
    # mask applied before everything above; its logprobs are read after the mask, as vLLM's are.
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        _require(isinstance(self.logprobs, bool), "logprobs", "logprobs must be a boolean")
        _require(self.logprobs or not self.top_logprobs, "top_logprobs", "top_logprobs needs logprobs: true")
        _require(isinstance(self.logit_bias, dict) and len(self.logit_bias) <= MAX_LOGIT_BIAS
                 and all(is_int(k) and k >= 0 for k in self.logit_bias)
                 and all(LOGIT_BIAS.holds(v) for v in self.logit_bias.values()), "logit_bias",
                 f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to numbers in [-100, 100]")
        for name, bound in SAMPLING_BOUNDS.items():
            value = getattr(self, name)
            _require((name in ("seed", "prompt_logprobs") and value is None) or (name == "max_tokens" and value == 0)
                     or bound.holds(value), name, bound.message(name, value))
        _require(isinstance(self.stop, (tuple, list)) and len(self.stop) <= 4
                 and all(isinstance(s, str) and s for s in self.stop), "stop",
                 "stop must hold at most 4 non-empty strings")
        _require(isinstance(self.ignore_eos, bool), "ignore_eos", "ignore_eos must be a boolean")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def shapes_logits(self) -> bool:
        """Whether penalties or biases change the logits the answer is chosen from."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)
