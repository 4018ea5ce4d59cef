"""What every phase of the engine shares: the model and its helpers, the adapter slots bound around each forward,
and the forwards more than one phase runs (reading a thought's pieces, the reconstruction loss of ReLAT, arXiv
2606.06252).

The engine is one (`Engine` subclasses `EngineContext`) and hands itself to its phases, so that they run on exactly
its model, its slots and whatever a caller sets on it (a test's `latent_map` or `stop_ids`, a benchmark's
`adapter_cache`); a phase uses this interface only, never the scheduler's. The underscored methods are for the
engine's own modules, not for its callers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import cached_property

import torch

from ..adapter_cache import AdapterCache
from ..agents import AgentPrompts, Role
from ..chat import ChatFormat
from ..grammar import Grammars
from ..latent import LatentMap, SequenceState, Truncation, extend, latent_rollout, reconstruction_loss
from ..loading import LoadedModel
from ..lora import Binding, SlotBank
from ..models.huginn import HuginnForCausalLM, Recurrence
from ..params import ALL_TARGETS, TTTParams
from .rows import Piece, _owner, _Plain, _Sequence


def _out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeError other allocators (CPU, MPS) raise when memory runs out."""
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError)
                                                           and "out of memory" in str(error).lower())


class EngineContext:
    """The model an engine runs, its adapter slots and the helpers its phases share."""

    def __init__(self, loaded: LoadedModel, max_rank: int, num_slots: int, agent_prompts: AgentPrompts | None,
                 adapter_cache: AdapterCache | None):
        self.model = loaded.model
        # A recurrent-depth model (Huginn) runs each row at its request's depth: rows carry a RowRecurrence, bound
        # around every forward as the adapter slots are.
        self.recurrent = isinstance(self.model, HuginnForCausalLM)
        self.family = "huginn" if self.recurrent else str(getattr(self.model.config, "model_type", "unknown"))
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.weights_format = loaded.weights  # how the frozen linear layers are stored (quantized.py)
        # What an exported adapter names as its base: the folder or hub id the weights came from, else the name.
        self.base_model_name = getattr(self.model.config, "_name_or_path", "") or loaded.name
        self.device = self.model.device
        self.chat = ChatFormat(self.tokenizer)
        self.latent_map = LatentMap(self.model)  # realignment solved once, not per request
        self.lm_head = self.model.get_output_embeddings()
        self.vocabulary = self.lm_head.weight.shape[0]  # logits per position (logit_bias's ids must be below it)
        self.bank = SlotBank(self.model, num_slots=num_slots, max_rank=max_rank, targets=ALL_TARGETS)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self.stop_ids = self._stop_token_ids()
        self.agent_prompts = agent_prompts or AgentPrompts()
        # Off unless given one (an empty cache is falsy: it has a length).
        self.adapter_cache = adapter_cache if adapter_cache is not None else AdapterCache(max_entries=0, max_bytes=0)

    @cached_property
    def grammars(self) -> Grammars:
        """The structured-output backend, built on first use (a server builds it at start-up: Service.load), so
        that engines that never constrain an answer never import it."""
        return Grammars(self.tokenizer, self.vocabulary, self.stop_ids)

    def _stop_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        generation_config = getattr(self.model, "generation_config", None)  # relat_core's own models have none
        configured = generation_config.eos_token_id if generation_config is not None else None
        ids.update(configured if isinstance(configured, list) else [configured])
        for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return {i for i in ids if i is not None}

    def _release_memory(self, error: Exception) -> None:
        """After an out-of-memory error on CUDA: hand the allocator's cached blocks back, so that the smaller
        batches that follow are not refused by a heap fragmented by the failed one."""
        if _out_of_memory(error) and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _binding(self, rows: list[_Sequence], on: list[bool]) -> Binding | None:
        """Batch row i through its request's adapter where on[i], else through none; None when no row uses one."""
        if not any(on):
            return None
        pairs = list(zip(rows, on, strict=True))
        adapted = [row for row, use in pairs if use]
        return self.bank.binding_for([row.slot if use else 0 for row, use in pairs],
                                     [row.ttt.alpha / row.ttt.rank if use else 0.0 for row, use in pairs],
                                     {kind for row in adapted for kind in row.ttt.targets},
                                     max(row.ttt.rank for row in adapted))

    def _bind(self, rows: list[_Sequence | _Plain], on: list[bool]):
        """The forwards inside run each row through its adapter where on[i] (one binding, gathered once)."""
        return self._bound(rows, self._binding(rows, on))

    @contextmanager
    def _bound(self, rows: list[_Sequence | _Plain], binding: Binding | None) -> Iterator[Recurrence | None]:
        """The forwards inside run row i through `binding` and, on a recurrent-depth model, at its request's depth;
        yields that Recurrence, which receives the recurrences each position ran (None on other models)."""
        # Exits apply where the forwards are bound without gradient: not in a training step, whose forwards all run
        # at full depth, those of its thought's graph-free first latent steps too.
        recurrence = Recurrence([_owner(row).depth for row in rows], exits=not torch.is_grad_enabled()) \
            if self.recurrent else None
        with self.bank.bound(binding), self.model.recurring(recurrence) if self.recurrent else nullcontext():
            yield recurrence

    def _agent_turn(self, sequence: _Sequence, role: Role, latent_steps: int) -> Piece:
        """An agent's prompt: the request's messages with its last user turn replaced by the agent's, holding the
        earlier agents' text where the agent reads it (TextMAS) and the answer format for the last agent."""
        messages = sequence.messages
        question = sequence.segments.question
        context = "\n\n".join(sequence.context) if role.reads_context else ""
        answer_format = sequence.trace.answer_format if role == sequence.team[-1] else "text"
        turn = self.agent_prompts.turn(role, question, context, answer_format)
        token_ids, question_start = self.chat.prompt(messages[:-1] + [{"role": "user", "content": turn}], question)
        return Piece(token_ids, question_start, latent_steps)

    def _no_hidden(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.model.config.hidden_size, dtype=self.model.dtype, device=self.device)

    def _read_pieces(self, state: SequenceState, hidden: torch.Tensor, pieces: list[list[Piece]],
                     params: list[TTTParams], contrast: list[tuple[int, int]] = (),
                     first_read: dict[int, torch.Tensor | None] | None = None) -> torch.Tensor:
        """Append each row's pieces to `state`: its tokens (left-padded to a common width, the question's marked),
        then its latent steps; returns each row's last hidden state, (B, d). Rows with fewer pieces, shorter
        prompts or shorter thoughts get padding positions, invisible to all, so each row gets what it would alone.
        contrast: (row, reference) pairs of contrastive feedback (latent_rollout); a reference is a row too.
        In training, rows with backprop_latent_steps are truncated over their whole thought (latent.Truncation).
        first_read: rows (its keys) whose first piece's hidden states, (T, d) over its T tokens, are put in it (the
        prompt's logprobs: completion.py)."""
        truncation = Truncation.of(params, [sum(piece.latent_steps for piece in row) for row in pieces])
        for k in range(max((len(row) for row in pieces), default=0)):
            now = [row[k] if k < len(row) else None for row in pieces]
            width = max(len(piece.token_ids) if piece else 0 for piece in now)
            if width:
                token_ids = torch.full((len(now), width), self.tokenizer.pad_token_id, device=self.device)
                valid = torch.zeros(len(now), width, dtype=torch.bool, device=self.device)
                question = torch.zeros_like(valid)
                for index, piece in enumerate(now):
                    if piece and piece.token_ids:
                        first = width - len(piece.token_ids)
                        token_ids[index, first:] = torch.tensor(piece.token_ids, device=self.device)
                        valid[index, first:] = True
                        question[index, first + piece.question_start:] = True
                reading = [index for index, piece in enumerate(now) if piece and piece.token_ids]
                if truncation is not None:
                    hidden = truncation.sever(state, hidden)
                with truncation.forward(reading) if truncation is not None else nullcontext():
                    read = extend(self.model, state, input_ids=token_ids, valid=valid, question=question)
                if first_read and k == 0:
                    for index in first_read:
                        first_read[index] = read[index, width - len(now[index].token_ids):]
                read = read[:, -1]
                hidden = torch.where(valid[:, -1:], read, hidden)
            hidden = latent_rollout(self.model, state, hidden, [piece.latent_steps if piece else 0 for piece in now],
                                    self.latent_map, params, contrast, truncation)
        return hidden

    def _reconstruction(self, rows: list[_Sequence], state: SequenceState, scored: list[bool] | None = None
                        ) -> torch.Tensor:
        """Per-row reconstruction loss (B,): the question's tokens after the latent thought, with every prompt's
        question hidden (`state.question`). Rows not `scored` take no part (all padding; their loss is 0)."""
        scored = scored or [True] * len(rows)
        segments = [row.segments for row in rows]
        batch = len(segments)
        length = max(len(s.recon_ids) for s, use in zip(segments, scored, strict=True) if use)
        recon_ids = torch.full((batch, length), self.tokenizer.pad_token_id, device=self.device)
        labels = torch.full((batch, length), -100, device=self.device)
        valid = torch.zeros(batch, length, dtype=torch.bool, device=self.device)
        for index, (s, use) in enumerate(zip(segments, scored, strict=True)):
            if use:
                recon_ids[index, :len(s.recon_ids)] = torch.tensor(s.recon_ids, device=self.device)
                labels[index, :len(s.recon_labels)] = torch.tensor(s.recon_labels, device=self.device)
                valid[index, :len(s.recon_ids)] = True
        return reconstruction_loss(self.model, state, recon_ids, valid, labels)
