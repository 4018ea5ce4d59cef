"""Latent thoughts over a Hugging Face causal LM: masked incremental forwards, the hidden-to-embedding map,
the L-step rollout and the reconstruction loss.

Follows LatentMAS (arXiv 2511.20639) for the open loop: the last layer's hidden state (after the final norm) at
the last position is mapped back to input-embedding scale and fed as the next `inputs_embeds`; no LM head runs in a
latent step. ReLAT (arXiv 2606.06252) adds the reconstruction of the question from the latent thought alone.

Every forward gets an explicit 4-D additive attention mask and explicit position ids, so that one code path
serves left-padded batches, latent steps and the reconstruction pass, which must not see the question's tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from .models.huginn import HuginnCache, HuginnForCausalLM
from .params import TTTParams


class LayerCache(DynamicCache):
    """transformers' per-layer KV cache with the row and position operations of a SequenceState (Huginn's cache,
    relat_core/models/huginn/cache.py, has the same ones over its per-recurrence entries)."""

    def __init__(self, config):
        super().__init__(config=config)
        self.config = config  # for the copies `row` makes

    def select_rows(self, rows: torch.Tensor) -> None:
        self.batch_select_indices(rows)

    def crop_to(self, length: int) -> None:
        """Hold at most `length` positions in every layer (after a failed forward, the layers it reached hold
        more than the others)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]

    def detach_rows(self, rows: torch.Tensor) -> None:
        """Make the cached keys and values of these rows ((B,) bool) constants to the gradient."""
        for layer in self.layers:
            if layer.is_initialized:
                keep = rows[:, None, None, None]
                layer.keys = torch.where(keep, layer.keys.detach(), layer.keys)
                layer.values = torch.where(keep, layer.values.detach(), layer.values)

    def drop_leading(self, count: int) -> None:
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[..., count:, :], layer.values[..., count:, :]

    def row(self, index: int, first: int) -> LayerCache:
        """A copy of row `index` from position `first` on."""
        rows = torch.tensor([index], device=self.layers[0].keys.device)
        return _layer_cache(self.config, [(layer.keys[rows, ..., first:, :], layer.values[rows, ..., first:, :])
                                          for layer in self.layers])

    @classmethod
    def joined(cls, config, parts: Sequence[tuple[LayerCache, int]], length: int) -> LayerCache:
        """The rows of several caches (each with its batch size; empty ones allowed) as one batch, each row
        left-padded to `length` positions."""
        filled = [cache for cache, _ in parts if cache.get_seq_length()]
        if not filled:
            return _layer_cache(config, None)
        layers = []
        for index, template in enumerate(filled[0].layers):
            keys, values = [], []
            for cache, rows in parts:
                if cache.get_seq_length():
                    part_keys, part_values = cache.layers[index].keys, cache.layers[index].values
                else:  # no tensors yet: an empty row shaped like the others
                    shape = (rows, *template.keys.shape[1:-2], 0, template.keys.shape[-1])
                    part_keys = part_values = template.keys.new_zeros(shape)
                keys.append(F.pad(part_keys, (0, 0, length - part_keys.shape[-2], 0)))
                values.append(F.pad(part_values, (0, 0, length - part_values.shape[-2], 0)))
            layers.append((torch.cat(keys), torch.cat(values)))
        return _layer_cache(config, layers)


def _layer_cache(config, layers: list[tuple[torch.Tensor, torch.Tensor]] | None) -> LayerCache:
    """A cache holding these (keys, values) per layer; empty for None."""
    cache = LayerCache(config=config)
    if layers is not None:
        for layer, (keys, values) in zip(cache.layers, layers, strict=True):
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
    return cache


KVCache = LayerCache | HuginnCache


def new_cache(model: nn.Module) -> KVCache:
    """An empty cache of the model's kind: per layer, or per (block, recurrence step) for Huginn."""
    return model.new_cache() if isinstance(model, HuginnForCausalLM) else LayerCache(config=model.config)


@dataclass
class SequenceState:
    """A batch of sequences sharing one KV cache: what each row may attend to and its next position."""

    cache: KVCache
    visible: torch.Tensor  # (B, K) bool: cached keys a later query may attend to (False for padding)
    next_position: torch.Tensor  # (B,) long
    # (B, K) bool: the positions that hold or follow the question in a prompt, hidden from the reconstruction
    question: torch.Tensor

    @classmethod
    def empty(cls, model: nn.Module, batch_size: int, device: torch.device) -> SequenceState:
        none = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        return cls(new_cache(model), none, torch.zeros(batch_size, dtype=torch.long, device=device), none)

    @property
    def length(self) -> int:
        return self.visible.shape[1]

    @property
    def batch_size(self) -> int:
        return self.visible.shape[0]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (a decoding batch whose requests left), and drop the leading positions that
        no remaining row can see, so that a batch does not keep paying for the padding of requests long gone."""
        if self.length:
            self.cache.select_rows(rows)
        self.visible = self.visible[rows]
        self.question = self.question[rows]
        self.next_position = self.next_position[rows]
        seen = self.visible.any(0)
        first = int(seen.int().argmax()) if bool(seen.any()) else self.length
        if first:
            self.cache.drop_leading(first)
            self.visible, self.question = self.visible[:, first:], self.question[:, first:]

    def split(self, model: nn.Module) -> list[SequenceState]:
        """One state per row (copies), each without the padding only the other rows needed: how a request's
        working memory leaves a batch to wait for its next agent."""
        parts = []
        for row in range(self.batch_size):
            index = torch.tensor([row], device=self.visible.device)
            seen = self.visible[row]
            first = int(seen.int().argmax()) if bool(seen.any()) else self.length
            cache = self.cache.row(row, first) if self.length else new_cache(model)
            parts.append(SequenceState(cache, self.visible[index, first:], self.next_position[index],
                                       self.question[index, first:]))
        return parts

    @classmethod
    def concatenate(cls, model: nn.Module, states: Sequence[SequenceState]) -> SequenceState:
        """The rows of several states as one batch, each left-padded to the longest with invisible positions:
        how a request joins a decoding batch that is already running (positions are explicit, so padding is
        harmless). States may be empty (a request whose thought has not started)."""
        length = max(state.length for state in states)
        cache = type(states[0].cache).joined(model.config, [(state.cache, state.batch_size) for state in states],
                                             length)

        def padded(masks: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([F.pad(mask, (length - mask.shape[1], 0), value=False) for mask in masks])

        return cls(cache, padded([s.visible for s in states]), torch.cat([state.next_position for state in states]),
                   padded([s.question for s in states]))

    def truncate(self, length: int, next_position: torch.Tensor) -> None:
        """Drop cached positions past `length` (the reconstruction pass is scored, then forgotten)."""
        self.cache.crop_to(length)
        self.visible, self.question = self.visible[:, :length], self.question[:, :length]
        self.next_position = next_position


def extend(model: PreTrainedModel, state: SequenceState, *, input_ids: torch.Tensor | None = None,
           inputs_embeds: torch.Tensor | None = None, valid: torch.Tensor | None = None,
           hidden_keys: torch.Tensor | None = None, question: torch.Tensor | None = None) -> torch.Tensor:
    """Append T positions to every row and return their final-norm hidden states, (B, T, d).

    valid: (B, T) bool, False for padding (not attended to, no position consumed).
    hidden_keys: (B, K) bool, cached keys these new queries must not attend to (they stay visible afterwards).
    question: (B, T) bool, the new positions that hold or follow the question (hidden from a reconstruction).
    """
    new = input_ids if input_ids is not None else inputs_embeds
    batch, steps = new.shape[0], new.shape[1]
    device = new.device
    if valid is None:
        valid = torch.ones(batch, steps, dtype=torch.bool, device=device)
    past = state.length
    positions = (state.next_position[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
    keys = torch.cat([state.visible if hidden_keys is None else state.visible & ~hidden_keys, valid], dim=1)
    key_index = torch.arange(past + steps, device=device)
    query_index = past + torch.arange(steps, device=device)
    allowed = keys[:, None, :] & (key_index[None, None, :] <= query_index[None, :, None])  # (B, T, K+T)
    allowed |= key_index[None, None, :] == query_index[None, :, None]  # a padding query sees itself: no NaN rows
    dtype = model.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    if isinstance(state.cache, HuginnCache):  # its own module: the recurrence as bound per row (`recurring`)
        output = model(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=state.cache,
                       attention_mask=mask[:, None], position_ids=positions, return_logits=False)
    else:
        output = model.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask[:, None],
                                  position_ids=positions, past_key_values=state.cache, use_cache=True)
    state.visible = torch.cat([state.visible, valid], dim=1)
    state.question = torch.cat([state.question, valid & question if question is not None else
                                torch.zeros_like(valid)], dim=1)
    state.next_position = state.next_position + valid.sum(1)
    return output.last_hidden_state


class LatentMap:
    """Maps a last-layer hidden state to the next input embedding (one row, (d,) -> (d,)).

    - "norm": the hidden state rescaled to the mean input-embedding norm;
    - "realign": LatentMAS's least-squares map W_a (W_out W_a ≈ W_in, solved once per model here), then "norm";
    - "soft": a soft token, the input embeddings' expectation under the LM head's distribution at a temperature,
      optionally over the top-k tokens only (summaries of ReLAT, arXiv 2606.06252): it stays
      on the span of real token embeddings, which a small model reads better than a realigned hidden state, and
      it is differentiable, so the reconstruction gradient still flows through it;
    - "none": the hidden state as it is.
    """

    def __init__(self, model: PreTrainedModel):
        self.embeddings = model.get_input_embeddings().weight  # (V, d), shared: no copy
        self.lm_head = model.get_output_embeddings()
        w_in = self.embeddings.detach().float()
        self.target_norm = w_in.norm(dim=1).mean()
        w_out = self.lm_head.weight.detach().float()  # (V, d)
        gram = w_out.T @ w_out + 1e-5 * torch.eye(w_out.shape[1], device=w_out.device)
        self.realign = torch.linalg.solve(gram, w_out.T @ w_in)  # (d, d): least squares W_out W_a ≈ W_in

    def __call__(self, hidden: torch.Tensor, mapping: str, soft_temperature: float = 1.0,
                 soft_top_k: int = 0) -> torch.Tensor:
        if mapping == "none":
            return hidden
        if mapping == "soft":
            return self.soft(hidden, soft_temperature, soft_top_k)
        if mapping == "realign":
            hidden = hidden @ self.realign.to(hidden.dtype)
        norm = hidden.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        return hidden * (self.target_norm.to(hidden.dtype) / norm)

    def soft(self, hidden: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
        logits = self.lm_head(hidden).float() / temperature  # (V,)
        if 0 < top_k < logits.shape[-1]:
            logits, tokens = torch.topk(logits, top_k)  # (k,): the rest of the vocabulary gets no mass
            table = self.embeddings[tokens]
        else:
            table = self.embeddings
        # Softmax in fp32, the product in the table's dtype: casting a bf16 table (V x d) to fp32 would copy all of
        # it every latent step of every row.
        return (torch.softmax(logits, dim=-1).to(table.dtype) @ table).to(hidden.dtype)


class Truncation:
    """Truncated backpropagation through a training thought (`backprop_latent_steps` k): to the gradient, each
    row's positions before its last k latent steps are constants.

    Per row, `before_cut` counts the latent steps still before its cut. A forward in a batch whose rows are all
    before their cut runs without a graph (the saving: no activations kept, no backward through it); in a batch
    where some are not, the rows before their cut run with a graph like the others, and what they carry across
    the cut (cache, hidden state, a residual latent) is detached (`sever`) once they reach it, so that each row
    gets the gradient it would get alone."""

    def __init__(self, before_cut: list[int]):
        self.before_cut = before_cut
        self.graph = [False] * len(before_cut)  # the row holds positions computed with a graph that its cut severs
        self.severed: list[int] = []  # the rows the last `sever` detached

    @classmethod
    def of(cls, params: Sequence[TTTParams], latent_steps: Sequence[int]) -> Truncation | None:
        """For rows with these options and thoughts of these lengths; None when no row truncates."""
        before = [max(0, steps - ttt.backprop_latent_steps) if ttt.backprop_latent_steps else 0
                  for ttt, steps in zip(params, latent_steps, strict=True)]
        return cls(before) if any(before) and torch.is_grad_enabled() else None

    def graph_free(self) -> bool:
        """Every row is before its cut. Rows that only pad a forward count too: a forward without a graph appends
        to every row's cache, and the cache it leaves would hold no graph for the rows past their cut."""
        return all(before > 0 for before in self.before_cut)

    def forward(self, rows: Sequence[int]):
        """The context of a forward in which `rows` take part: without a graph where every row is before its cut."""
        graph_free = self.graph_free()
        if not graph_free:
            for row in rows:
                self.graph[row] |= self.before_cut[row] > 0
        return torch.no_grad() if graph_free else contextlib.nullcontext()

    def sever(self, state: SequenceState, hidden: torch.Tensor) -> torch.Tensor:
        """Detach the rows that have reached their cut with a graph behind them; returns the hidden state."""
        rows = self.severed = [row for row, before in enumerate(self.before_cut) if before == 0 and self.graph[row]]
        if not rows:
            return hidden
        mask = torch.zeros(len(self.before_cut), dtype=torch.bool, device=hidden.device)
        mask[rows] = True
        if state.length:
            state.cache.detach_rows(mask)
        for row in rows:
            self.graph[row] = False
        return torch.where(mask[:, None], hidden.detach(), hidden)

    def stepped(self, rows: Sequence[int]) -> None:
        for row in rows:
            self.before_cut[row] = max(0, self.before_cut[row] - 1)


def latent_rollout(model: PreTrainedModel, state: SequenceState, last_hidden: torch.Tensor, steps: Sequence[int],
                   latent_map: LatentMap, params: Sequence[TTTParams],
                   contrast: Sequence[tuple[int, int]] = (), truncation: Truncation | None = None) -> torch.Tensor:
    """Run each row's latent thought from `last_hidden` (B, d); returns each row's last latent hidden state.

    Rows may differ in length, mapping and mixing: a row past its own length gets padding positions (invisible,
    no position consumed) and keeps its hidden state, so a batch computes what each row would alone.

    contrast: (row, reference) pairs, contrastive latent feedback (Wang et al., arXiv 2506.08552; notes section 9):
    the row's next input f(h_row) moves by eta = params[row].contrastive_eta along f(h_row) - f(h_reference), and
    the reference row (the same prompt through another model: the base model, adapter off) is fed the same
    input, so that each step compares the two models on one input.
    truncation: a training thought's truncated backpropagation (`Truncation`), advanced one latent step per step.
    """
    batch = last_hidden.shape[0]
    reference_of = dict(contrast)
    references = set(reference_of.values())
    previous: list[torch.Tensor | None] = [None] * batch
    for t in range(max(steps, default=0)):
        active = torch.tensor([t < length for length in steps], device=last_hidden.device)
        taking_part = [row for row, length in enumerate(steps) if t < length]
        if truncation is not None:
            last_hidden = truncation.sever(state, last_hidden)
            for row in truncation.severed:
                if previous[row] is not None:
                    previous[row] = previous[row].detach()
        embeds: list[torch.Tensor | None] = [None] * batch
        for row in range(batch):  # (d,) operations: cheap next to the forward pass
            if row in references:
                continue  # set with the row it is the reference of
            ttt = params[row]
            embed = latent_map(last_hidden[row], ttt.mapping, ttt.soft_temperature, ttt.soft_top_k)
            reference = reference_of.get(row)
            if reference is not None:
                base = latent_map(last_hidden[reference], ttt.mapping, ttt.soft_temperature, ttt.soft_top_k)
                embed = embed + ttt.contrastive_eta * (embed - base)
            alpha = ttt.residual_alpha
            if alpha and previous[row] is not None:
                embed = alpha * previous[row] + (1 - alpha) * embed
            previous[row] = embed
            embeds[row] = embed
            if reference is not None:
                embeds[reference] = embed
        with truncation.forward(taking_part) if truncation is not None else contextlib.nullcontext():
            latest = extend(model, state, inputs_embeds=torch.stack(embeds)[:, None], valid=active[:, None])[:, -1]
        last_hidden = torch.where(active[:, None], latest, last_hidden)
        if truncation is not None:
            truncation.stepped(taking_part)
    return last_hidden


def reconstruction_loss(model: PreTrainedModel, state: SequenceState, recon_ids: torch.Tensor,
                        recon_valid: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per row of rebuilding the question after the latent thought, (B,).

    recon_ids: (B, T) instruction + question tokens, right-padded; labels: (B, T) the next token where it is a
    question token, else -100. The positions of `state.question` (every prompt's question and what follows it)
    are hidden from this pass, else the model copies them and no gradient reaches the latents.
    """
    hidden = extend(model, state, input_ids=recon_ids, valid=recon_valid, hidden_keys=state.question)
    scored = labels != -100  # logits only where a loss needs them
    logits = model.get_output_embeddings()(hidden[scored]).float()
    token_loss = F.cross_entropy(logits, labels[scored], reduction="none")
    rows = scored.nonzero()[:, 0]
    total = torch.zeros(recon_ids.shape[0], device=logits.device).index_add(0, rows, token_loss)
    return total / scored.sum(1).clamp(min=1)
