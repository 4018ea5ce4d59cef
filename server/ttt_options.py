"""The TTT options (`TTTOptions`): the fields of relat_core/params.py's TTTParams that a server default, a request's
`relat` object or a `relat ask` flag may set, declared once.

`Settings` (server/settings.py) and the request models (server/protocol.py) inherit them; the command-line flags
are built from them (server/settings.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field
from pydantic_settings import NoDecode

from relat_core.params import (
    ALL_TARGETS,
    Agents,
    AnswerContext,
    AnswerFormat,
    ExitCriterion,
    FollowUp,
    Gate,
    Mapping,
    Method,
    Objective,
    Target,
)

from .bounded_fields import bounded


class TTTOptions(BaseModel):
    """The TTT parameters (relat_core/params.py) that a server default or a request's `relat` object may set.

    Shared by `Settings` and the request models so that a new parameter is declared once. Left out (None), a field
    takes the next default down: the request's, the server's, then the engine's for the loaded model.
    """

    method: Method | None = Field(None, description="direct, latent (open loop) or relat (closed loop)")
    steps: bounded("steps") | None = Field(None, description="test-time training steps N")
    latent_steps: bounded("latent_steps") | None = Field(
        None, description="latent thought length L (at least 1 for relat)")
    lr: bounded("lr") | None = Field(None, description="AdamW learning rate of the adapter")
    rank: bounded("rank") | None = Field(None, description="LoRA rank of the adapter, up to the server's max_rank")
    alpha: bounded("alpha") | None = Field(None, description="LoRA alpha (scale alpha/rank)")
    targets: Annotated[Annotated[list[Target], Field(min_length=1)] | None, NoDecode] = Field(
        None, description=f"layers that carry the adapter, among {','.join(ALL_TARGETS)}: the model's own (a name "
                          "it lacks is a 400 listing them)")
    adapter_during_answer: bool | None = Field(None, description="keep the adapter on while decoding the answer")
    stop_loss: bounded("stop_loss") | None = Field(
        None, description="stop training once the reconstruction loss is this low")
    max_grad_norm: bounded("max_grad_norm") | None = Field(None, description="gradient clipping norm")
    weight_decay: bounded("weight_decay") | None = Field(None, description="AdamW weight decay")
    mapping: Mapping | None = Field(None, description="hidden-to-embedding map: norm, realign, soft or none")
    soft_temperature: bounded("soft_temperature") | None = Field(
        None, description="temperature of soft latent tokens")
    soft_top_k: bounded("soft_top_k") | None = Field(
        None, description="soft latent tokens over the top-k tokens only, 0 = all")
    residual_alpha: bounded("residual_alpha") | None = Field(
        None, description="residual mixing of latent embeddings")
    follow_up: FollowUp | None = Field(None, description="what separates thought and answer: bridge or restate")
    answer_context: AnswerContext | None = Field(
        None, description="relat: answer after the thought, or from the question alone with the adapter on")
    guidance: bounded("guidance") | None = Field(
        None, description="answer logits l_plain + w (l_thought - l_plain); 1 = off, 0 = direct")
    contrastive_eta: bounded("contrastive_eta") | None = Field(
        None, description="relat: contrastive feedback of the final thought, adapted vs base model; 0 = off")
    reconstruction_instruction: str | None = Field(
        None, pattern=r"\S", description="the instruction of the reconstruction turn (not blank)")
    agents: Agents | None = Field(
        None, description="single, sequential (planner, critic, refiner, judger) or hierarchical (maths, science, "
                          "code, summariser)")
    agent_max_tokens: bounded("agent_max_tokens") | None = Field(
        None, description="text each agent may write before the last (direct)")
    answer_format: AnswerFormat | None = Field(
        None, description="the answer's format: auto, text, boxed (maths), choice (a letter) or code (python)")
    cache: bool | None = Field(
        None, description="relat: take the adapter from the adapter cache when the same training ran before, and "
                          "cache this one; false trains afresh and caches nothing")
    backprop_latent_steps: bounded("backprop_latent_steps") | None = Field(
        None, description="relat: train through the thought's last this many latent steps only (truncated "
                          "backpropagation; 0 = all of it)")
    objective: Objective | None = Field(
        None, description="relat: what test-time training minimises: reconstruction (rebuild the question from the "
                          "latent thought), prompt_lm (next-token loss of the question's tokens in the prompt, no "
                          "thought) or entropy (mean entropy of the first answer-token distributions, no thought)")
    entropy_tokens: bounded("entropy_tokens") | None = Field(
        None, description="objective entropy: tokens of the base model's greedy draft answer whose predicting "
                          "distributions' mean entropy is minimised")
    gate: Gate | None = Field(
        None, description="relat: train only where the signals say so, else answer as direct (token for token, no "
                          "adapter): none (train always), fidelity (when l0, the reconstruction loss through the base "
                          "model's thought, > gate_threshold), confidence (when the confidence of direct's first "
                          "draft_tokens tokens < gate_threshold) or auto (a fitted score over both > gate_threshold)")
    gate_threshold: bounded("gate_threshold") | None = Field(
        None, description="the gate's threshold on its signal (default: the gate's own, chosen on search halves)")
    draft_tokens: bounded("draft_tokens") | None = Field(
        None, description="gate confidence or auto: the tokens of direct's answer drafted before the gate decides")
    logprob_shift: bool | None = Field(
        None, description="with logprobs: each answer token's logprob under the base model on the plain prompt too "
                          "(relat_base_logprob), to show what the thought, adapter and guidance changed; one more "
                          "decoding row per answer (a 400 without logprobs; as a server default, it applies to the "
                          "requests that ask for logprobs)")
    num_steps: bounded("num_steps") | None = Field(
        None, description="recurrent-depth models (Huginn) only, a 400 on others: core-block recurrences per "
                          "position (default: the model's mean_recurrence)")
    init_scale: bounded("init_scale") | None = Field(
        None, description="Huginn: scale of the random initial latent state, drawn from the seed; 0 = a zero state "
                          "(default 1)")
    exit_criterion: ExitCriterion | None = Field(
        None, description="Huginn: adaptive exit per position: none, kl, latent-diff or argmax-stability (never "
                          "past num_steps)")
    exit_threshold: bounded("exit_threshold") | None = Field(
        None, description="Huginn: the exit criterion's threshold (default: Huginn's for the criterion)")
    backprop_depth: bounded("backprop_depth") | None = Field(
        None, description="Huginn, relat: train through each position's last this many recurrences (default: the "
                          "model's mean_backprop_depth)")

    def ttt_fields(self) -> dict[str, Any]:
        """The TTT fields that were set, as TTTParams keyword arguments."""
        values = self.model_dump(include=set(TTT_FIELDS), exclude_none=True)
        if "targets" in values:
            values["targets"] = tuple(values["targets"])
        return values


TTT_FIELDS: tuple[str, ...] = tuple(TTTOptions.model_fields)


TTT_FIELDS: tuple[str, ...] = tuple(TTTOptions.model_fields)
