"""The answer phase: the decoding batch, one token of every answering row per engine step (continuous batching, as
vLLM decodes).

Every answering request is a row of one KV cache: its own answer, the copies of it when it asks for n answers, the
plain row of a guided request (the base model on the prompt alone, whose logits guide the owner's: arXiv
2511.16886), and a TextMAS agent writing its text for the agents after it (LatentMAS, arXiv 2511.20639). Each step
chooses every row's token from its (guided) logits, emits the text, ends the answers that stop (an end-of-sequence
token, a stop string, the length limit), and feeds the others' tokens as one batch; a feed that fails is fed again
in halves, so that only a row that fails alone fails.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch

from ..agents import labelled
from ..decoding import IncrementalDetokenizer, sample, shape_logits
from ..export import export_adapter
from ..latent import SequenceState, extend
from ..models.huginn import Recurrence
from .context import EngineContext
from .events import AgentDone, Choice, Event, Finished, Result, TextDelta, TokenLogprob, Usage
from .rows import _Decoding, _owner, _Plain, _Sequence, agent_done

log = logging.getLogger("relat_core")


class Answerer:
    """Owns the decoding batch: rows join it from the think phase (`join`), take one token per `run`, and leave it
    when they finish, fail or are aborted (`leave`)."""

    def __init__(self, context: EngineContext, requests: dict[str, _Sequence],
                 fail: Callable[[_Sequence, Exception], tuple[str, Event]], settle: Callable[[_Sequence], bool]):
        self.context = context
        # The scheduler's requests, by id: a request that finishes here leaves them, and only a request still
        # among them can fail (`fail`, the scheduler's: it aborts the request, which leaves the batch).
        self.requests = requests
        self.fail = fail
        # A gated request's draft is complete: True keeps it answering (the gate's, relat_core/engine/gating.py).
        self.settle = settle
        self.decoding: _Decoding | None = None

    def join(self, rows: list[_Sequence | _Plain], state: SequenceState, hidden: torch.Tensor) -> None:
        """Rows that have read their thought or prompt join the decoding batch, behind the rows already in it; a
        request asking for n answers joins as n rows."""
        rows, state, hidden = self._with_answers(rows, state, hidden)
        for row in rows:  # an answer starts its grammar afresh (a gated request's, after training too)
            if isinstance(row, _Sequence) and row.sampling.structured_output and not row.writes_agent_text:
                row.grammar = self.context.grammars.matcher(row.sampling.structured_output)
        if self.decoding is not None:
            state = SequenceState.concatenate(self.context.model, [self.decoding.state, state])
            hidden = torch.cat([self.decoding.hidden, hidden])
            rows = self.decoding.rows + rows
        self.decoding = _Decoding(rows, state, hidden)

    def _with_answers(self, rows: list[_Sequence | _Plain], state: SequenceState, hidden: torch.Tensor
                      ) -> tuple[list[_Sequence | _Plain], SequenceState, torch.Tensor]:
        """A request asking for n answers gets n decoding rows, copies of its row's cache (and of its plain row,
        when guided): one training and one thought, n answers sampled apart."""
        def answers(row: _Sequence | _Plain) -> int:
            owner = _owner(row)
            return 1 if owner.writes_agent_text else owner.sampling.n

        if all(answers(row) == 1 for row in rows):
            return rows, state, hidden
        index: list[int] = []
        expanded: list[_Sequence | _Plain] = []
        for i, row in enumerate(rows):
            copies: list[_Sequence | _Plain] = [row]
            if answers(row) > 1 and isinstance(row, _Sequence):
                row.siblings = [self._answer_row(row, k) for k in range(1, row.sampling.n)]
                copies += row.siblings
            elif answers(row) > 1:  # the plain row of a guided request: one beside each answer
                copies += [_Plain(sibling) for sibling in row.owner.siblings]
            index += [i] * len(copies)
            expanded += copies
        state.select(torch.tensor(index, device=self.context.device))
        return expanded, state, hidden[index]

    def _answer_row(self, row: _Sequence, k: int) -> _Sequence:
        """Answer k of a request: its row's copy with a generator of its own, seeded seed + k."""
        generator = torch.Generator()
        if row.sampling.seed is None:
            generator.seed()
        else:
            seed = row.sampling.seed + k
            generator.manual_seed(seed - 2**64 if seed >= 2**64 else seed)
        return dataclasses.replace(row, choice=k, leader=row, siblings=[], ended={}, tokens=[], logprobs=[],
                                   grammar=None, unsent_logprobs=[], generator=generator,
                                   detokenizer=IncrementalDetokenizer(self.context.tokenizer, row.sampling.stop))

    def run(self) -> list[tuple[str, Event]]:
        """One token for every decoding request: choose it from its (guided) logits, emit its text, and feed the
        tokens of the rows that go on (a guided request's plain row gets its owner's token) as one batch."""
        context = self.context
        batch = self.decoding
        with torch.no_grad():
            logits = self._guided_logits(batch.rows, context.lm_head(batch.hidden).float())  # (B, V)
            constrained = {i: row.grammar for i, row in enumerate(batch.rows)
                           if isinstance(row, _Sequence) and row.grammar is not None}
            if constrained:  # structured outputs: each constrained row's logits, masked by its own grammar
                context.grammars.mask(logits, constrained)
            greedy = logits.argmax(-1).tolist()
        events: list[tuple[str, Event]] = []
        chosen: dict[int, int] = {}  # by id of the request going on: its token
        plain_of = {id(row.owner): i for i, row in enumerate(batch.rows) if isinstance(row, _Plain)}
        ended = []
        for index, row in enumerate(batch.rows):
            if isinstance(row, _Plain):
                continue
            try:
                shaped = shape_logits(logits[index], row.sampling, row.tokens)  # penalties, logit_bias
                if row.forced is not None:  # a scored continuation (completion.py): its next token, as given
                    token = row.forced_tokens[min(len(row.tokens), len(row.forced_tokens) - 1)]
                elif row.sampling.greedy:
                    token = int(shaped.argmax()) if row.sampling.shapes_logits else greedy[index]
                else:
                    token = sample(shaped, row.sampling, row.generator)
                if row.drafting:
                    row.gate_draft.record(logits[index], token)
                entry = self._logprob(row, logits[index], token, self._base_logits(row, logits, index, plain_of))
                finished = self._accept(row, token, events, entry)
            except Exception as error:
                events.append(self.fail(row, error))  # leaves the batch through abort_request
                continue
            if finished:
                ended.append(row)
            else:
                chosen[id(row)] = token
        self.leave(ended)
        if chosen:
            batch = self.decoding
            tokens = torch.tensor([chosen[id(_owner(row))] for row in batch.rows], device=context.device)[:, None]
            if batch.stale:
                batch.binding = context._binding(batch.rows, [row.answers_with_adapter for row in batch.rows])
                batch.stale = False
            length = batch.state.length
            try:
                with torch.no_grad(), context._bound(batch.rows, batch.binding) as recurrence:
                    batch.hidden = extend(context.model, batch.state, input_ids=tokens)[:, -1]
                self._record_depths(batch.rows, recurrence)
                return events
            except Exception as error:
                failure = error
            events += self._feed_apart(batch, tokens, length, failure)
        return events

    def _feed_apart(self, batch: _Decoding, tokens: torch.Tensor, length: int, failure: Exception
                    ) -> list[tuple[str, Event]]:
        """After feeding the decoding batch its tokens failed: feed it again in halves, down to one row, so that
        only a request whose row fails alone fails (a batch too large for the memory left goes on as smaller
        ones); the rows fed become the decoding batch again, in their order."""
        context = self.context
        batch.state.cache.crop_to(length)  # the layers the failed forward reached hold its keys: drop them
        context._release_memory(failure)
        log.warning("a decoding batch of %d failed (%r); feeding it again in halves", len(batch.rows), failure)
        singles = batch.state.split(context.model)
        batch.state = batch.hidden = None  # the copies in `singles` replace it
        fed: list[tuple[SequenceState, torch.Tensor, list[_Sequence | _Plain]]] = []
        failed: dict[int, tuple[_Sequence, Exception]] = {}  # by id of the request

        def feed(rows: range, error: Exception | None) -> None:
            if error is None:
                state = SequenceState.concatenate(context.model, [singles[i] for i in rows])
                part = [batch.rows[i] for i in rows]
                try:
                    with torch.no_grad(), context._bind(part, [row.answers_with_adapter for row in part]) as recurrence:
                        fed.append((state, extend(context.model, state, input_ids=tokens[rows.start:rows.stop])[:, -1],
                                    part))
                    self._record_depths(part, recurrence)
                    return
                except Exception as raised:
                    error = raised
                del state
                context._release_memory(error)
            if len(rows) == 1:
                owner = _owner(batch.rows[rows.start])
                failed.setdefault(id(owner), (owner, error))
                return
            middle = (rows.start + rows.stop) // 2
            feed(range(rows.start, middle), None)
            feed(range(middle, rows.stop), None)

        feed(range(len(batch.rows)), failure)
        if fed:
            batch.rows = [row for *_, part in fed for row in part]
            batch.state = SequenceState.concatenate(context.model, [state for state, *_ in fed])
            batch.hidden = torch.cat([hidden for _, hidden, _ in fed])
            batch.stale = True
        else:
            self.decoding = None
        # A failed request leaves the batch (its own and its plain row) through abort_request.
        return [self.fail(row, error) for row, error in failed.values() if row.request_id in self.requests]

    @staticmethod
    def _record_depths(rows: list[_Sequence | _Plain], recurrence: Recurrence | None) -> None:
        """Each answer position just read back: the recurrences it ran, kept by its request for the trace."""
        if recurrence is None or recurrence.used is None:
            return
        for row, used in zip(rows, recurrence.used[:, -1].tolist(), strict=True):
            if isinstance(row, _Sequence) and not row.writes_agent_text:
                (row.leader or row).answer_depths.append(used)

    @staticmethod
    def _guided_logits(rows: list[_Sequence | _Plain], logits: torch.Tensor) -> torch.Tensor:
        """Each guided request's logits become l_plain + w (l_own - l_plain) (latent reasoning read as guidance,
        arXiv 2511.16886), with l_plain from its plain row; other rows are left as they are."""
        # A plain row there for logprob_shift alone mixes nothing: l_plain + 1 (l_own - l_plain) is not l_own in floats.
        plain = [i for i, row in enumerate(rows) if isinstance(row, _Plain) and row.owner.ttt.guided]
        if not plain:
            return logits
        index_of = {id(row): i for i, row in enumerate(rows)}
        own = [index_of[id(rows[i].owner)] for i in plain]
        weight = torch.tensor([rows[i].owner.ttt.guidance for i in plain], device=logits.device)[:, None]
        logits[own] = logits[plain] + weight * (logits[own] - logits[plain])
        return logits

    def _base_logits(self, row: _Sequence, logits: torch.Tensor, index: int, plain_of: dict[int, int]
                     ) -> torch.Tensor | None:
        """logprob_shift: the base model's logits on the plain prompt at this answer's position, its plain row's
        (guidance mixes the owner's, never the plain row's), or its own where the answer is the base model's on the
        plain prompt (rows.py's needs_plain_row); None when not asked for. A structured answer's are masked by its
        grammar as its own are, so that the shift is what the request changed within it, not the grammar."""
        if not (row.ttt.logprob_shift and row.sampling.logprobs) or row.writes_agent_text:
            return None
        if not row.needs_plain_row:
            return logits[index]
        base = logits[plain_of[id(row)]]
        if row.grammar is not None:
            base = base[None].clone()
            self.context.grammars.mask(base, {0: row.grammar})  # the grammar's place before this token
            base = base[0]
        return base

    def _logprob(self, row: _Sequence, logits: torch.Tensor, token: int,
                 base: torch.Tensor | None = None) -> TokenLogprob | None:
        """The chosen token's logprob and the top_logprobs likeliest tokens', from the logits the row decoded from
        (guided, before penalties and temperature: vLLM's raw mode), and its logprob under `base` (logprob_shift);
        None unless the answer asked for them."""
        if not row.sampling.logprobs or row.writes_agent_text:
            return None
        # A token a grammar masked out has logprob -inf, which JSON cannot carry: -9999, as vLLM reports it.
        log_probs = torch.log_softmax(logits.float(), dim=-1).clamp(min=-9999.0)
        decode = self.context.tokenizer.decode
        top: tuple[tuple[str, float], ...] = ()
        if row.sampling.top_logprobs:
            values, ids = log_probs.topk(row.sampling.top_logprobs)
            top = tuple((decode([i]), v) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
        base_logprob = None if base is None else \
            float(torch.log_softmax(base.float(), dim=-1).clamp(min=-9999.0)[token])
        return TokenLogprob(token, decode([token]), float(log_probs[token]), top, base_logprob)

    @staticmethod
    def _sent_logprobs(row: _Sequence) -> list[TokenLogprob] | None:
        """The logprobs of the tokens a text delta completes (None when the request did not ask for them)."""
        if not row.sampling.logprobs or row.writes_agent_text:
            return None
        sent, row.unsent_logprobs = row.unsent_logprobs, []
        return sent

    def _accept(self, row: _Sequence, token: int, events: list[tuple[str, Event]],
                entry: TokenLogprob | None = None) -> bool:
        """Take a row's next token; returns True when the row leaves the decoding batch: it has finished (its events
        appended), or it was a TextMAS agent whose turn has ended (the request thinks again for the next agent)."""
        context = self.context
        agent_text = row.writes_agent_text
        limit = row.ttt.agent_max_tokens if agent_text else row.sampling.max_tokens if row.forced is None \
            else len(row.forced_tokens)
        finish_reason = None
        if limit == 0:  # max_tokens 0: the prompt was read (its logprobs, the training), and nothing is answered
            finish_reason = "length"
        elif token in context.stop_ids and (agent_text or not row.sampling.ignore_eos or row.grammar is not None):
            # A structured answer ends at the stop token its completed grammar allows, ignore_eos or not.
            finish_reason = "stop"  # the stop token is not part of the answer, nor its logprob
        else:
            if row.grammar is not None:
                row.grammar.accept(token)
            row.tokens.append(token)
            if entry is not None:
                row.logprobs.append(entry)
                row.unsent_logprobs.append(entry)
            if len(row.tokens) == 1 and not agent_text and not row.drafting:
                row.trace.timings["first_token_s"] = time.perf_counter() - row.start
            delta = row.detokenizer.push(token)
            if delta and not agent_text:
                text = TextDelta(delta, row.choice, self._sent_logprobs(row))
                (row.gate_draft.held if row.drafting else events).append((row.request_id, text))
            if row.detokenizer.stopped:
                finish_reason = "stop"
            elif len(row.tokens) >= limit:
                finish_reason = "length"
        if row.drafting and (finish_reason is not None or len(row.tokens) >= row.gate_draft.limit):
            held = row.gate_draft.held
            if not self.settle(row):
                return True  # it trains: it leaves the batch, and answers afresh after training
            events += held  # it keeps direct's answer: its text so far, now
            if row.tokens:
                row.trace.timings["first_token_s"] = time.perf_counter() - row.start
        if finish_reason is None:
            return False
        tail = row.detokenizer.finish()
        now = time.perf_counter()
        if agent_text:
            events.append(self._end_agent_text(row, now))
            return True
        if tail or row.unsent_logprobs:
            events.append((row.request_id, TextDelta(tail, row.choice, self._sent_logprobs(row))))
        request = row.leader or row
        request.ended[row.choice] = Choice(row.choice, row.detokenizer.text, finish_reason, row.tokens,
                                           row.logprobs if row.sampling.logprobs else None)
        if len(request.ended) < request.sampling.n:
            return True  # this answer has ended; the request ends with its last
        choices = [request.ended[k] for k in range(request.sampling.n)]
        completion_tokens = sum(len(choice.token_ids) for choice in choices)
        request.final_signals()
        request.trace.timings["decode_s"] = now - request.decode_start
        request.trace.timings["total_s"] = now - request.start
        depths = request.answer_depths
        if depths:
            request.trace.recurrences = {"mean": sum(depths) / len(depths), "min": min(depths), "max": max(depths),
                                         "positions": len(depths)}
        if request.team:
            role = request.team[-1]
            request.trace.agent_turns.append({
                "role": role.name, "label": role.label, "kind": "answer", "prompt_tokens": len(request.prompt_ids),
                "latent_positions": 0, "completion_tokens": completion_tokens, "seconds": now - request.decode_start})
        prompt_tokens = request.prompt_tokens or len(request.segments.prompt_ids)
        usage = Usage(prompt_tokens, request.agent_tokens + completion_tokens)
        first = choices[0]
        result = Result(first.text, first.finish_reason, usage, request.trace, first.token_ids, choices=choices,
                        prompt_logprobs=request.prompt_logprobs, prompt_token_ids=request.prompt_ids)
        if request.return_adapter and request.adapted:  # before the slot goes back: the next request resets it
            result.adapter = export_adapter(context.bank, request.slot, request.ttt.rank, request.ttt.alpha,
                                            request.ttt.targets, context.base_model_name)
            request.trace.adapter = result.adapter.summary()
        events.append((request.request_id, Finished(result)))
        self.requests.pop(request.request_id, None)
        if request.slot is not None:
            context.bank.release(request.slot)
        return True

    def _end_agent_text(self, row: _Sequence, now: float) -> tuple[str, AgentDone]:
        """A TextMAS agent's turn has ended: its text joins the context of the agents after it, and the request
        goes back to the think phase for the next agent's fresh prompt."""
        role, text = row.team[row.agent], row.detokenizer.text
        turn = {"role": role.name, "label": role.label, "kind": "text", "prompt_tokens": len(row.prompt_ids),
                "latent_positions": 0, "completion_tokens": len(row.tokens), "seconds": now - row.decode_start,
                "text": text}
        row.context.append(labelled(role, text))
        row.agent_tokens += len(row.tokens)
        row.tokens = []
        row.agent += 1
        row.answer_prompt = self.context._agent_turn(row, row.team[row.agent], 0)
        row.phase = "think"
        return agent_done(row, turn)

    def leave(self, rows: list[_Sequence]) -> None:
        """Drop rows from the decoding batch (finished, aborted or failed)."""
        batch = self.decoding
        if batch is None or not rows:
            return
        keep = [i for i, row in enumerate(batch.rows) if _owner(row) not in rows]
        if not keep:
            self.decoding = None
            return
        index = torch.tensor(keep, device=self.context.device)
        batch.state.select(index)
        batch.rows = [batch.rows[i] for i in keep]
        batch.hidden = batch.hidden[index]
        batch.stale = True
