"""The think phase: the latent thought with the final weights, then the start of the answer.

Each engine step, every thinking request runs its next piece of thought (LatentMAS, arXiv 2511.20639: latent steps
feed the last hidden state back as the next input embedding; one piece per agent, on a working memory kept between
engine steps), with its own adapter where it was adapted and, with contrastive feedback, its base model beside it
as a reference row. A request whose thought is complete has its reconstruction scored (ReLAT, arXiv 2606.06252),
reads the follow-up segment, and joins the decoding batch (relat_core/engine/answering.py); requests answering from
the prompt alone, and the plain rows of guided requests (arXiv 2511.16886), are prefilled afresh.
"""

from __future__ import annotations

import time

import torch

from ..decoding import IncrementalDetokenizer
from ..latent import SequenceState, extend
from ..params import TTTParams
from .answering import Answerer
from .completion import prompt_logprobs
from .context import EngineContext
from .events import Event
from .rows import Piece, _Memory, _owner, _Plain, _Sequence, agent_done


class Thinker:
    """Runs the think phase of its rows; the rows whose thought is complete leave it for the Answerer's decoding
    batch ("decode"), and the others wait for their next agent ("think")."""

    def __init__(self, context: EngineContext, answerer: Answerer):
        self.context = context
        self.answerer = answerer

    def run(self, rows: list[_Sequence]) -> list[tuple[str, Event]]:
        """The think phase: run each row's next piece of thought with the final weights (its own adapter or none).
        A row whose thought goes on (an agent before the last; latent, relat) keeps its working memory for the
        next engine step. A row whose thought is complete has its reconstruction scored (adapted rows), reads the
        follow-up (or its last agent's turn) and joins the decoding batch (the first token comes in this same
        engine step).

        Rows that answer from the prompt alone (direct and TextMAS agents; relat with answer_context "question")
        are prefilled afresh, each with its adapter on or off, and so are the plain rows of guided requests
        (adapter off). Nothing about a row changes until the whole phase has succeeded."""
        context = self.context
        start = time.perf_counter()
        thinking = [row for row in rows if row.thinks]
        prompt_alone = [row for row in rows if not row.thinks]
        waiting: list[tuple[_Sequence, _Memory, _Memory | None]] = []  # rows whose next agent runs next step
        answering: list[_Sequence | _Plain] = []  # the decoding rows, in the order of `parts`
        parts: list[tuple[SequenceState, torch.Tensor]] = []
        losses: dict[int, float] = {}  # by id of the row
        prompt_scores: dict[int, list] = {}  # by id of the row: its prompt's logprobs, where it asked for them
        with torch.no_grad():
            if thinking:
                first_read = {i: None for i, row in enumerate(thinking) if _scores_prompt(row)}
                state, hidden, references = self._thought(thinking, first_read)
                self._score_prompts(thinking, first_read, prompt_scores)
                goes_on = [row.piece + 1 < len(row.pieces) for row in thinking]
                if any(goes_on):
                    memories = [_Memory(part, hidden[i:i + 1]) for i, part in enumerate(state.split(context.model))]
                    twins = {i: _Memory(part, references[1][k:k + 1])
                             for k, (i, part) in enumerate(zip(references[2], references[0].split(context.model),
                                                                strict=True))} if references else {}
                    waiting = [(row, memories[i], twins.get(i)) for i, row in enumerate(thinking) if goes_on[i]]
                    done = [i for i, on in enumerate(goes_on) if not on]
                    state = SequenceState.concatenate(context.model, [memories[i].state for i in done]) \
                        if done else None
                    hidden = hidden[done]
                    thinking = [thinking[i] for i in done]
                if thinking:
                    scored = [row.needs_score for row in thinking]
                    if any(scored):
                        length, position = state.length, state.next_position
                        with context._bind(thinking, [row.adapted for row in thinking]):
                            values = context._reconstruction(thinking, state, scored).tolist()
                        state.truncate(length, position)
                        losses = {id(row): value for row, value, use in zip(thinking, values, scored, strict=True)
                                  if use}
                    keep = [i for i, row in enumerate(thinking) if row.answers_after_thought]
                    if len(keep) < len(thinking) and keep:
                        state.select(torch.tensor(keep, device=context.device))
                        hidden = hidden[keep]
                    if keep:
                        after = [thinking[i] for i in keep]
                        parts.append((state, self._read_follow_up(after, state, hidden)))
                        answering += after
                    prompt_alone += [row for row in thinking if not row.answers_after_thought]
            starting = prompt_alone + [row for row in thinking if row.answers_after_thought]
            plain: list[_Sequence | _Plain] = list(prompt_alone)
            plain += [_Plain(row) for row in starting if row.needs_plain_row]
            if plain:
                # A row answering from its prompt alone: its prompt's logprobs are this read's, after the thought's.
                first_read = {i: None for i, row in enumerate(plain) if isinstance(row, _Sequence)
                              and _scores_prompt(row)}
                with context._bind(plain, [row.answers_with_adapter for row in plain]):
                    parts.append(self._prefill([_owner(row).prompt_ids for row in plain], first_read))
                self._score_prompts(plain, first_read, prompt_scores)
                answering += plain
        # The phase has succeeded: from here on, the rows change.
        now = time.perf_counter()
        events: list[tuple[str, Event]] = []
        for row in rows:
            timings = row.trace.timings
            timings.setdefault("train_s", start - row.start - timings.get("gate_s", 0.0))
            timings["think_s"] = timings.get("think_s", 0.0) + now - start
        for row, memory, reference in waiting:
            row.memory, row.reference = memory, reference
            events.append(agent_done(row, self._latent_turn(row, now - start)))
        for row in {id(row): row for row in answering if isinstance(row, _Sequence)}.values():
            if id(row) in losses:
                row.trace.recon_loss_after = losses[id(row)]
            elif row.adapted:
                row.trace.recon_loss_after = row.loss_now
            if row.team and row.pieces and row.piece < len(row.pieces):  # the last latent agent's turn
                events.append(agent_done(row, self._latent_turn(row, now - start)))
            row.memory = row.reference = None
            if id(row) in prompt_scores:
                row.prompt_logprobs = prompt_scores[id(row)]
            row.prompt_tokens += len(row.follow_ids if row.answers_after_thought and row.team else row.prompt_ids)
            row.detokenizer = IncrementalDetokenizer(context.tokenizer, () if row.writes_agent_text
                                                     else row.sampling.stop)
            row.decode_start, row.phase = now, "decode"
        if answering:
            state = parts[0][0] if len(parts) == 1 else SequenceState.concatenate(context.model, [p[0] for p in parts])
            self.answerer.join(answering, state, torch.cat([p[1] for p in parts]))
        return events

    def _thought(self, rows: list[_Sequence], first_read: dict[int, torch.Tensor | None] | None = None
                 ) -> tuple[SequenceState, torch.Tensor, tuple[SequenceState, torch.Tensor, list[int]] | None]:
        """Each row's next piece of thought on its working memory (a single model's whole thought on an empty
        one), with its adapter where it was adapted. A row with contrastive feedback brings its base model along as
        a reference row of the same forwards (adapter off, fed the same latents, with a memory of its own).
        Returns the rows' state and last hidden states, and the references' (state, hidden, their rows) if any;
        first_read (the rows its keys name) receives the hidden states of each row's piece's tokens."""
        context = self.context
        contrasted = [i for i, row in enumerate(rows) if row.adapted and row.ttt.contrastive_eta > 0]
        members = rows + [rows[i] for i in contrasted]
        memories = [row.memory for row in rows] + [rows[i].reference for i in contrasted]
        state = SequenceState.concatenate(context.model, [
            memory.state if memory else SequenceState.empty(context.model, 1, context.device) for memory in memories])
        hidden = torch.cat([memory.hidden if memory else context._no_hidden(1) for memory in memories])
        pieces = [[row.pieces[row.piece]] for row in members]
        with context._bind(members, [row.adapted for row in rows] + [False] * len(contrasted)):
            hidden = context._read_pieces(state, hidden, pieces, [row.ttt for row in members],
                                          [(i, len(rows) + k) for k, i in enumerate(contrasted)], first_read)
        if not contrasted:
            return state, hidden, None
        own = torch.arange(len(rows), device=context.device)
        twins = torch.arange(len(rows), len(members), device=context.device)
        references = SequenceState.concatenate(context.model, [state])  # a copy: select below works in place
        references.select(twins)
        state.select(own)
        return state, hidden[own], (references, hidden[twins], contrasted)

    def _read_follow_up(self, rows: list[_Sequence], state: SequenceState, hidden: torch.Tensor) -> torch.Tensor:
        """Feed each row's follow-up segment after its thought (adapter as while answering); returns the hidden
        state that gives each row's first answer token, (B, d)."""
        context = self.context
        follow = [row.follow_ids for row in rows]
        if not any(follow):
            return hidden
        width = max(len(ids) for ids in follow)
        follow_ids = torch.full((len(rows), width), context.tokenizer.pad_token_id, device=context.device)
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=context.device)
        for index, ids in enumerate(follow):
            follow_ids[index, :len(ids)] = torch.tensor(ids, dtype=torch.long, device=context.device)
            valid[index, :len(ids)] = True
        with context._bind(rows, [row.answers_with_adapter for row in rows]):
            read = extend(context.model, state, input_ids=follow_ids, valid=valid)
        last = torch.tensor([max(len(ids) - 1, 0) for ids in follow], device=context.device)
        has_follow = torch.tensor([bool(ids) for ids in follow], device=context.device)
        return torch.where(has_follow[:, None], read[torch.arange(len(rows)), last], hidden)

    def _prefill(self, prompts: list[list[int]], first_read: dict[int, torch.Tensor | None] | None = None
                 ) -> tuple[SequenceState, torch.Tensor]:
        """Prefill prompts as one left-padded batch; returns the state and each row's last hidden state, (B, d).
        first_read (the rows its keys name) receives the hidden states of each of those rows' prompt tokens."""
        context = self.context
        state = SequenceState.empty(context.model, len(prompts), context.device)
        hidden = context._read_pieces(state, context._no_hidden(len(prompts)),
                                      [[Piece(ids, len(ids), 0)] for ids in prompts], [TTTParams()] * len(prompts),
                                      first_read=first_read)
        return state, hidden

    def _score_prompts(self, rows: list[_Sequence | _Plain], first_read: dict[int, torch.Tensor | None],
                       scores: dict[int, list]) -> None:
        """The logprobs of the prompts just read (SamplingParams.prompt_logprobs), by id of their row; a later
        read of a row's prompt (the answer's, after the thought's) replaces an earlier one."""
        for index, hidden in first_read.items():
            row = _owner(rows[index])
            scores[id(row)] = prompt_logprobs(self.context, row.prompt_ids, hidden, row.sampling.prompt_logprobs)

    def _latent_turn(self, row: _Sequence, seconds: float) -> dict:
        """Record the latent agent that just ran (its piece) and move to the next."""
        piece = row.pieces[row.piece]
        row.prompt_tokens += len(piece.token_ids)
        role = row.team[row.piece]
        row.piece += 1
        row.agent = row.piece
        return {"role": role.name, "label": role.label, "kind": "latent", "prompt_tokens": len(piece.token_ids),
                "latent_positions": piece.latent_steps, "completion_tokens": 0, "seconds": seconds}


def _scores_prompt(row: _Sequence) -> bool:
    """The row's request asked for its prompt's logprobs (a single model: its one prompt is its thought's)."""
    return row.sampling.prompt_logprobs is not None and not row.team
