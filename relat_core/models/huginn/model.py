"""HuginnForCausalLM: prelude, the recurrence s <- core(adapter([s, e])) with per-row depths and exits, and coda.

Parameter names are the published checkpoint's (arXiv 2502.05171; seal-rg/recurrent-pretraining), so its
safetensors load as they are (`relat_core.models.huginn.loading`).

Shapes: B batch rows, T new positions in a call, K cached positions, H heads, D head size, d = n_embd.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .cache import HuginnCache, _ChunkEntries
from .config import HuginnConfig
from .modules import AttentionMask, CausalSelfAttention, RMSNorm, Rope, SandwichBlock, rope_angles
from .recurrence import MAX_RECURRENCE, Recurrence, RowRecurrence, _position_seed, _RowExits


@dataclass
class HuginnOutput:
    logits: Tensor | None  # (B, T, V) fp32, None when not asked for
    last_hidden_state: Tensor  # (B, T, d): after the coda and the final norm, what the LM head reads
    latent_states: Tensor  # (B, T, d): each position's recurrent state after its last step (before any norm)
    recurrences: Tensor  # (B, T) long: core-block iterations each position used
    cache: HuginnCache | None


class HuginnForCausalLM(nn.Module):
    """Parameter names are the checkpoint's (`transformer.prelude.0.attn.Wqkv.weight`, ...), so the published
    safetensors load as they are."""

    def __init__(self, config: HuginnConfig):
        super().__init__()
        self.config = config
        width = config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_rows, width),
            prelude=nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_prelude)),
            adapter=nn.Linear(2 * width, width, bias=config.bias),  # over concat(state, embedded input)
            core_block=nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_recurrent_block)),
            coda=nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_coda)),
            ln_f=RMSNorm(width, config.norm_eps),  # used twice: after the recurrence and after the coda
        ))
        self.lm_head = nn.Linear(width, config.embedding_rows, bias=False)
        self.recurrence: Recurrence | None = None  # bound per batch by `recurring`
        if self.lm_head.weight.device.type != "meta":  # built on meta to be loaded: nothing to initialise
            self.reset_parameters()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer["wte"].weight

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The "takase" init of the reference (for random models in tests and benchmarks): truncated normals with
        std sqrt(2 / 5d), output projections scaled down by sqrt(2 * expected depth)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.effective_expected_depth)

        def normal(tensor: Tensor, scale: float) -> None:
            nn.init.trunc_normal_(tensor, std=scale, a=-3 * scale, b=3 * scale, generator=generator)

        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, CausalSelfAttention) and module.qk_bias is not None:
                nn.init.zeros_(module.qk_bias)
            elif isinstance(module, nn.Embedding):
                normal(module.weight, std)
            elif isinstance(module, nn.Linear) and name != "lm_head":
                if name.endswith("mlp.fc"):  # gate rows like an input projection, up rows like an output one
                    gate, up = module.weight.chunk(2, dim=0)
                    normal(gate, std)
                    normal(up, out_std)
                else:
                    normal(module.weight, out_std if name.endswith(".proj") else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if not self.config.tie_embeddings:
            normal(self.lm_head.weight, std)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer["wte"].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer["wte"].weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer["wte"]  # type: ignore[return-value]

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def new_cache(self) -> HuginnCache:
        return HuginnCache(self.config)

    @contextmanager
    def recurring(self, recurrence: Recurrence | None) -> Iterator[None]:
        """The forwards inside iterate each row as `recurrence` says (None: as their arguments say)."""
        self.recurrence = recurrence
        try:
            yield
        finally:
            self.recurrence = None

    def seeded_initial_state(self, like: Tensor, rows: Sequence[RowRecurrence], position_ids: Tensor) -> Tensor:
        """Each row's initial state, every position drawn from its own seeded generator (`RowRecurrence`)."""
        state = torch.zeros(like.shape, dtype=torch.float32)
        positions = position_ids.tolist()
        for index, row in enumerate(rows):
            std = self.config.init_std * row.init_scale
            if std <= 0:
                continue
            for column, position in enumerate(positions[index]):
                generator = torch.Generator().manual_seed(_position_seed(row.noise_seed, position))
                nn.init.trunc_normal_(state[index, column], std=std, a=-3 * std, b=3 * std, generator=generator)
        return (state * self.config.embed_scale).to(device=like.device, dtype=like.dtype)

    def initial_state(self, like: Tensor, init_scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """The state before the first recurrence: a truncated normal of std init_std * init_scale (times
        embed_scale, as the embeddings), or zeros for init_scale 0, which makes the forward deterministic."""
        std = self.config.init_std * init_scale
        if std <= 0:
            return torch.zeros_like(like)
        state = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        nn.init.trunc_normal_(state, std=std, a=-3 * std, b=3 * std, generator=generator)
        return (state * self.config.embed_scale).to(like.dtype)

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        *,
        cache: HuginnCache | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        num_steps: int | Sequence[int] | Tensor | None = None,
        init_scale: float = 1.0,
        initial_state: Tensor | None = None,
        exit_criterion: str | None = None,
        exit_threshold: float | str | None = None,
        backprop_depth: int | None = None,
        return_logits: bool = True,
        generator: torch.Generator | None = None,
    ) -> HuginnOutput:
        """Run T new positions per row through prelude, recurrence and coda; append them to `cache` if given.

        input_ids (B, T) or inputs_embeds (B, T, d): embeddings as the embedding table holds them (the model
            multiplies either by embed_scale, as the reference does).
        attention_mask: None for causal attention over the cache and the new positions, else a (B, T, K+T) or
            (B, 1, T, K+T) mask, bool (True: may attend) or additive, for padded batches and hidden keys.
        position_ids: (B, T); by default K, K+1, ... for every row.
        num_steps: recurrences, an int, one per row (B,) or one per position (B, T); default mean_recurrence.
        init_scale: the random initial state's scale; 0 gives zeros. initial_state (B, T, d) replaces it (a warm
            start, the reference's continuous compute).
        exit_criterion: None, "kl", "latent-diff" or "argmax-stability": a position stops iterating once it fires
            (`exit_threshold`, default the reference's), and never runs more than its num_steps. Only without
            gradient: a forward that records one runs every position its full num_steps, as Huginn trained.
        backprop_depth: with gradient, it flows through each position's last backprop_depth recurrences only
            (truncated backpropagation, as Huginn trained); the steps before run without a graph where they can.
        A bound `Recurrence` (`recurring`) replaces num_steps, init_scale, the exit and backprop_depth per row.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        embeds = self.transformer["wte"](input_ids) if input_ids is not None else inputs_embeds.to(self.dtype)
        batch, length = embeds.shape[:2]
        device = embeds.device
        past = cache.length if cache is not None else 0
        if cache is not None and cache.batch_size not in (None, batch):
            raise ValueError(f"cache holds {cache.batch_size} rows, the call has {batch}")
        if position_ids is None:
            position_ids = (past + torch.arange(length, device=device)).expand(batch, length)
        rope = rope_angles(position_ids, self.config.head_dim, self.config.rope_base)
        mask = self._attention_mask(attention_mask, length, past, device)
        bound = self.recurrence
        if bound is not None and len(bound.rows) != batch:
            raise ValueError(f"the bound recurrence has {len(bound.rows)} rows, the call has {batch}")
        if bound is not None:
            rows = bound.rows
            num_steps = [row.num_steps for row in rows]
            exits = [(row.exit_criterion, row.exit_threshold) for row in rows]
            truncation = [row.backprop_depth or MAX_RECURRENCE for row in rows]
        else:
            exits = [(exit_criterion, exit_threshold)] * batch
            truncation = [backprop_depth or MAX_RECURRENCE] * batch
        targets = self._step_targets(num_steps, batch, length, device)
        training = torch.is_grad_enabled()
        with_exits = bound.exits if bound is not None else not training
        criterion = _RowExits(exits, device) if with_exits and not training else None
        # A position's state enters step s without its graph while s <= num_steps - backprop_depth, so that the
        # gradient crosses its last backprop_depth steps only; steps before every position's cut run graph-free.
        cut = (targets - torch.tensor(truncation, device=device)[:, None]).clamp(min=0)  # (B, T)
        graph_free_steps = int(cut.min()) if training else 0
        chunk = _ChunkEntries(self.config, cache)

        x = embeds * self.config.embed_scale
        for index, block in enumerate(self.transformer["prelude"]):
            x = block(x, rope, mask, chunk.prelude_source(index))
        injected = x
        if initial_state is not None:
            state = initial_state.to(injected.dtype)
        elif bound is not None:
            state = self.seeded_initial_state(injected, bound.rows, position_ids)
        else:
            state = self.initial_state(injected, init_scale, generator)

        recurrences = torch.zeros(batch, length, dtype=torch.long, device=device)
        exited = torch.zeros(batch, length, dtype=torch.bool, device=device)
        if criterion is not None:
            criterion.start(state)
        for step in range(int(targets.max())):
            active = (targets > step) & ~exited
            if not bool(active.any()):
                break
            if training and step >= graph_free_steps:
                state = torch.where((step <= cut)[..., None], state.detach(), state)
            with torch.set_grad_enabled(training and step >= graph_free_steps):
                new_state = self.transformer["adapter"](torch.cat([state, injected], dim=-1))
                for layer, block in enumerate(self.transformer["core_block"]):
                    new_state = block(new_state, rope, mask, chunk.core_source(layer, step, active))
            state = torch.where(active[..., None], new_state, state)  # stopped positions keep their last state
            recurrences = recurrences + active.long()
            # Test for exits only where a position could still go on; the KL and argmax tests read the coda's
            # prediction from the current state (without keeping its entries: they are not the final ones).
            if criterion is not None and criterion.groups and bool((active & (targets > step + 1)).any()):

                def peek_logits(current: Tensor = state) -> Tensor:
                    return self.lm_head(self._coda(current, rope, mask, chunk, store=False))

                exited |= active & criterion.update(state, active, peek_logits)
        if bound is not None:
            bound.used = recurrences

        hidden = self._coda(state, rope, mask, chunk, store=True)
        logits = self.lm_head(hidden).float() if return_logits else None
        if cache is not None:
            cache.commit(chunk, recurrences)
        return HuginnOutput(logits=logits, last_hidden_state=hidden, latent_states=state, recurrences=recurrences,
                            cache=cache)

    def _coda(self, state: Tensor, rope: Rope, mask: AttentionMask, chunk: _ChunkEntries, store: bool) -> Tensor:
        x = self.transformer["ln_f"](state)
        for index, block in enumerate(self.transformer["coda"]):
            x = block(x, rope, mask, chunk.coda_source(index, store))
        return self.transformer["ln_f"](x)

    def _attention_mask(self, attention_mask: Tensor | None, length: int, past: int,
                        device: torch.device) -> AttentionMask:
        if attention_mask is not None:
            mask = attention_mask if attention_mask.dim() == 4 else attention_mask[:, None]
            if mask.shape[-2:] != (length, past + length):
                raise ValueError(f"attention_mask ends in {tuple(mask.shape[-2:])}, expected ({length}, "
                                 f"{past + length})")
            return AttentionMask(mask if mask.dtype == torch.bool else mask.to(self.dtype), causal=False)
        if past == 0:
            return AttentionMask(None, causal=length > 1)
        if length == 1:  # one new position sees everything cached
            return AttentionMask(None, causal=False)
        keys = torch.arange(past + length, device=device)
        queries = past + torch.arange(length, device=device)
        return AttentionMask((keys[None, :] <= queries[:, None])[None, None], causal=False)

    def _step_targets(self, num_steps: int | Sequence[int] | Tensor | None, batch: int, length: int,
                      device: torch.device) -> Tensor:
        """Recurrences per position, (B, T) long."""
        steps = torch.as_tensor(self.config.mean_recurrence if num_steps is None else num_steps, dtype=torch.long,
                                device=device)
        if steps.dim() == 0:
            steps = steps.expand(batch, length)
        elif steps.dim() == 1:
            steps = steps[:, None].expand(batch, length)
        if steps.shape != (batch, length):
            raise ValueError(f"num_steps has shape {tuple(steps.shape)}; give an int, ({batch},) or ({batch}, "
                             f"{length})")
        if bool((steps < 1).any()):  # a position without a step would have no core entries for later lookups
            raise ValueError("num_steps must be at least 1")
        return steps
