"""The training objectives besides ReLAT's reconstruction: the controls that the ReLAT paper (arXiv 2606.06252)
compares closing the loop through the latent thought against. Neither runs a latent thought in training.

- "prompt_lm": test-time training on the input (Sun et al., arXiv 1909.13231), the next-token cross-entropy of the
  question's tokens in the prompt. Scored: the tokens that hold the question as the chat template places them
  (Segments.question_start to question_end; the question is the last user message, with its answer-format
  instruction), each predicted from everything before it in the prompt, the first from the template's opening of
  the user turn. Read but not scored: the system message, earlier turns and the template's own tokens (its turn
  end and the assistant turn's opening after the question).
- "entropy": TENT (Wang et al., arXiv 2006.10726), the entropy of the model's own predictions minimised. At a
  request's first step the base model decodes a greedy draft after the prompt, graph-free: up to entropy_tokens
  tokens, ending after a stop token (the start of direct's greedy answer). Every step reads prompt + draft through
  the adapted model; the loss is the mean entropy, in nats, of the distributions that predict the draft's tokens
  (the prompt's last position and the draft's positions but its last). The draft is fixed for the whole training,
  so every step scores the same positions, and a step costs one forward of the prompt and k - 1 tokens.

Both read the request's own prompt (its messages through the chat template), with agents too, and return one loss
per row, (B,), as the reconstruction does (relat_core/latent.py). Rows are left-padded into one forward, and each
row's loss is the mean over its own positions, so each row gets what it would alone. The training phase binds each
row's adapter slot around these forwards (relat_core/engine/training.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..latent import SequenceState, extend
from .context import EngineContext
from .rows import _Sequence


def needs_draft(row: _Sequence) -> bool:
    return row.ttt.objective == "entropy" and row.draft is None


def greedy_drafts(context: EngineContext, rows: list[_Sequence]) -> list[list[int]]:
    """Each row's draft: up to its entropy_tokens greedy tokens of the base model (no adapter, no graph) after its
    prompt, ending after the first stop token."""
    drafts: list[list[int]] = [[] for _ in rows]

    def finished(draft: list[int], row: _Sequence) -> bool:
        return len(draft) >= row.ttt.entropy_tokens or (bool(draft) and draft[-1] in context.stop_ids)

    with torch.no_grad(), context._bind(rows, [False] * len(rows)):
        state = SequenceState.empty(context.model, len(rows), context.device)
        hidden = _read(context, state, [row.segments.prompt_ids for row in rows])[:, -1]
        while True:
            tokens = context.lm_head(hidden).argmax(-1)
            for draft, row, token in zip(drafts, rows, tokens.tolist(), strict=True):
                if not finished(draft, row):
                    draft.append(token)
            if all(finished(draft, row) for draft, row in zip(drafts, rows, strict=True)):
                return drafts
            hidden = extend(context.model, state, input_ids=tokens[:, None])[:, -1]


def losses(context: EngineContext, objective: str, rows: list[_Sequence], drafts: list[list[int]]) -> torch.Tensor:
    """The loss of each row under `objective` ("prompt_lm" or "entropy"), (B,), through whatever adapters the caller
    bound; drafts: each row's draft (entropy)."""
    if objective == "prompt_lm":
        return _prompt_lm(context, rows)
    if objective == "entropy":
        return _entropy(context, rows, drafts)
    raise ValueError(f"no training objective {objective!r} here")  # reconstruction is the training phase's own


def _prompt_lm(context: EngineContext, rows: list[_Sequence]) -> torch.Tensor:
    """Mean next-token cross-entropy of each row's question tokens in its prompt."""
    state = SequenceState.empty(context.model, len(rows), context.device)
    hidden = _read(context, state, [row.segments.prompt_ids for row in rows])
    width = hidden.shape[1]
    labels = torch.full((len(rows), width), -100, device=context.device)
    for index, row in enumerate(rows):
        segments = row.segments
        first = width - len(segments.prompt_ids)  # left padding
        start = max(segments.question_start, 1)  # a prompt's first token has nothing to be predicted from
        # The hidden state at prompt position j predicts token j + 1.
        labels[index, first + start - 1:first + segments.question_end - 1] = torch.tensor(
            segments.prompt_ids[start:segments.question_end], device=context.device)
    scored = labels != -100  # logits only where a loss needs them
    logits = context.lm_head(hidden[scored]).float()
    return _row_means(F.cross_entropy(logits, labels[scored], reduction="none"), scored, len(rows))


def _entropy(context: EngineContext, rows: list[_Sequence], drafts: list[list[int]]) -> torch.Tensor:
    """Mean entropy of the distributions that predict each row's draft tokens, read after its prompt."""
    state = SequenceState.empty(context.model, len(rows), context.device)
    hidden = _read(context, state, [row.segments.prompt_ids + draft[:-1] for row, draft in zip(rows, drafts,
                                                                                               strict=True)])
    width = hidden.shape[1]
    scored = torch.zeros(len(rows), width, dtype=torch.bool, device=context.device)
    for index, draft in enumerate(drafts):
        scored[index, width - len(draft):] = True  # each row's last len(draft) positions: right-aligned
    log_probs = F.log_softmax(context.lm_head(hidden[scored]).float(), dim=-1)
    return _row_means(-(log_probs.exp() * log_probs).sum(-1), scored, len(rows))


def _read(context: EngineContext, state: SequenceState, sequences: list[list[int]]) -> torch.Tensor:
    """Append each row's tokens to `state`, left-padded to a common width (padding is invisible and takes no
    position); returns their hidden states, (B, T, d), row i's in its last len(sequences[i]) columns."""
    width = max(len(ids) for ids in sequences)
    token_ids = torch.full((len(sequences), width), context.tokenizer.pad_token_id, device=context.device)
    valid = torch.zeros(len(sequences), width, dtype=torch.bool, device=context.device)
    for index, ids in enumerate(sequences):
        token_ids[index, width - len(ids):] = torch.tensor(ids, device=context.device)
        valid[index, width - len(ids):] = True
    return extend(context.model, state, input_ids=token_ids, valid=valid)


def _row_means(values: torch.Tensor, scored: torch.Tensor, batch: int) -> torch.Tensor:
    """The mean per row of per-position values, (B,); values are those of scored's True positions, in order."""
    rows = scored.nonzero()[:, 0]
    total = torch.zeros(batch, device=values.device).index_add(0, rows, values)
    return total / scored.sum(1).clamp(min=1)
