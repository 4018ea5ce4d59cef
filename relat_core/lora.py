"""Per-request LoRA adapters as batched slots, and an AdamW that keeps each slot's state apart.

Each adapted linear layer `y = x W^T` gets, for the request in batch row i bound to slot s_i,
    y_i += scale_i * (x_i A[s_i]^T) B[s_i]^T          A: (slots, r, in), B: (slots, out, r)
the gathered-matmul pattern of multi-LoRA servers (Punica/S-LoRA), here as two `bmm`s. A batch of one request is
the special case. Rank is per request: rows of A (columns of B) past a request's rank stay zero, receive zero
gradient and so stay zero under AdamW.

Why not peft for the hot path: peft creates and deletes a named adapter per request, which slows down as adapters
accumulate (peft issue #981), and it refuses mixed-adapter batches in train mode. peft remains the reference: the
tests check that a slot computes exactly what a peft `LoraConfig` adapter with the same A and B computes, and the
naive baseline in bench/ is a plain peft loop.

The adapter is attached with forward hooks, so the base model's modules, names and state dict stay as loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .params import ALL_TARGETS


@dataclass
class Binding:
    """Which slot each batch row uses in the next forward passes, and its scale (0 switches a row's adapter off)."""

    slots: torch.Tensor  # (B,) long
    scale: torch.Tensor  # (B,) float
    kinds: frozenset[str]  # target kinds at least one row adapts; other layers skip the adapter entirely
    rank: int  # the largest rank among the rows: rows of A past it are zero for every row, so never gathered
    # Each layer's rows of A and B, gathered on first use and kept for as long as the binding lives: a training
    # step runs 2 + L forwards through the same adapters, and a decoding batch many steps; gathering once (and,
    # in training, scattering the gradient back once) instead of per forward is a sixth of a training step.
    gathered: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class AdaptedLinear:
    """The slot tensors of one linear layer, applied by a forward hook."""

    def __init__(self, module: nn.Linear, kind: str, bank: SlotBank, num_slots: int, max_rank: int, name: str = ""):
        self.kind = kind
        self.name = name  # the module's path in the model ("model.layers.0.self_attn.q_proj"): PEFT's key
        self.index = len(bank.layers)
        self.bank = bank
        device = module.weight.device
        # fp32 master weights whatever the model dtype: AdamW in bf16 loses small updates.
        self.A = torch.zeros(num_slots, max_rank, module.in_features, device=device, requires_grad=True)
        self.B = torch.zeros(num_slots, module.out_features, max_rank, device=device, requires_grad=True)
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        binding = self.bank.binding
        if binding is None or self.kind not in binding.kinds:
            return None
        x = args[0]  # (B, T, in)
        # Gathered apart with and without gradient: a copy gathered in a graph-free part of a training forward (the
        # recurrences before Huginn's truncation) carries no graph, and the gradient would not reach the slot.
        key = (self.index, torch.is_grad_enabled())
        pair = binding.gathered.get(key)
        if pair is None:
            a = self.A[binding.slots, :binding.rank].to(x.dtype)  # (B, r, in)
            b = self.B[binding.slots, :, :binding.rank].to(x.dtype)  # (B, out, r)
            pair = binding.gathered[key] = (a.transpose(1, 2), b.transpose(1, 2))
        delta = torch.bmm(torch.bmm(x, pair[0]), pair[1])  # (B, T, out)
        return output + delta * binding.scale.to(x.dtype)[:, None, None]


def target_kind(name: str, targets: Sequence[str]) -> str | None:
    """The target a module path names, matched on whole components at its end: "model.layers.0.self_attn.q_proj"
    is q_proj, "transformer.core_block.1.attn.proj" is attn.proj (Huginn's attention and MLP both end in "proj")."""
    for target in targets:
        if name == target or name.endswith("." + target):
            return target
    return None


class SlotBank:
    """Adapter slots for every target layer of a model; a slot is leased to one request at a time."""

    def __init__(self, model: nn.Module, num_slots: int = 1, max_rank: int = 16,
                 targets: Sequence[str] = ALL_TARGETS):
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.binding: Binding | None = None
        self.layers: list[AdaptedLinear] = []
        for name, module in model.named_modules():
            kind = target_kind(name, targets)
            if isinstance(module, nn.Linear) and kind is not None:
                self.layers.append(AdaptedLinear(module, kind, self, num_slots, max_rank, name))
        if not self.layers:
            raise ValueError(f"the model has no linear layers named {', '.join(targets)}")
        self.kinds = frozenset(layer.kind for layer in self.layers)
        self.free = list(range(num_slots))
        self.optimizer = SlotAdamW(self.parameters(), num_slots)

    def parameters(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in (layer.A, layer.B)]

    def acquire(self) -> int | None:
        return self.free.pop(0) if self.free else None

    def release(self, slot: int) -> None:
        if slot not in self.free:
            self.free.append(slot)

    @torch.no_grad()
    def reset(self, slot: int, rank: int, targets: Sequence[str], generator: torch.Generator) -> None:
        """A fresh adapter: B = 0 (it starts as the base model), A drawn as peft does (kaiming-uniform, a=sqrt(5))."""
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds the engine's max_rank {self.max_rank}")
        missing = set(targets) - self.kinds
        if missing:
            raise ValueError(f"this model has no layers named {', '.join(sorted(missing))}")
        for layer in self.layers:
            layer.A[slot].zero_()
            layer.B[slot].zero_()
            if layer.kind in targets:
                fan_in = layer.A.shape[-1]
                bound = 1.0 / math.sqrt(fan_in)
                init = torch.rand(rank, fan_in, generator=generator, device=generator.device) * 2 * bound - bound
                layer.A[slot, :rank] = init.to(layer.A.device)
        self.optimizer.reset(slot)

    def binding_for(self, slots: Sequence[int], scales: Sequence[float], kinds: Sequence[str],
                    rank: int | None = None) -> Binding:
        """Batch row i through slot slots[i] at scales[i] (rank: the largest of the rows' ranks). Reuse a binding
        only while its slots' weights stay as they are (it keeps what it gathered)."""
        device = self.layers[0].A.device
        return Binding(torch.tensor(list(slots), device=device),
                       torch.tensor(list(scales), dtype=torch.float32, device=device),
                       frozenset(kinds), self.max_rank if rank is None else rank)

    @contextmanager
    def bound(self, binding: Binding | None) -> Iterator[None]:
        """Route the forwards inside through `binding` (None: the base model)."""
        self.binding = binding
        try:
            yield
        finally:
            self.binding = None

    def bind(self, slots: Sequence[int], scales: Sequence[float], kinds: Sequence[str],
             rank: int | None = None):
        """Route the forwards inside through these slots, for one use."""
        return self.bound(self.binding_for(slots, scales, kinds, rank))

    def zero_grad(self) -> None:
        for t in self.parameters():
            t.grad = None

    @torch.no_grad()
    def snapshot(self, slot: int, rank: int, targets: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """A copy of a slot's adapter: per layer, A[:rank] and B[:, :rank] where it adapts, else None."""
        return [(layer.A[slot, :rank].clone(), layer.B[slot, :, :rank].clone()) if layer.kind in targets else None
                for layer in self.layers]

    @torch.no_grad()
    def load(self, slot: int, weights: Sequence[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Put a snapshot's adapter into a slot (the rest of the slot zero), with fresh optimiser state."""
        for layer, pair in zip(self.layers, weights, strict=True):
            layer.A[slot].zero_()
            layer.B[slot].zero_()
            if pair is not None:
                a, b = pair
                layer.A[slot, :a.shape[0]] = a
                layer.B[slot, :, :b.shape[1]] = b
        self.optimizer.reset(slot)

    def slot_state(self, slot: int) -> list[torch.Tensor]:
        return [t[slot].detach().clone() for t in self.parameters()]


class SlotAdamW:
    """AdamW with one step count, learning rate and clipping norm per slot.

    torch.optim.AdamW keeps one step count per tensor, so requests that start at different times in a shared bank
    would get the wrong bias correction; this is the same update (same formula and order as torch's
    single-tensor AdamW, checked against it in the tests) applied row-wise to the slots being trained.
    """

    def __init__(self, params: list[torch.Tensor], num_slots: int, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params = params
        self.betas = betas
        self.eps = eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.step_count = torch.zeros(num_slots, dtype=torch.float64)

    @torch.no_grad()
    def reset(self, slot: int) -> None:
        for m, v in zip(self.exp_avg, self.exp_avg_sq, strict=True):
            m[slot].zero_()
            v[slot].zero_()
        self.step_count[slot] = 0

    @torch.no_grad()
    def grad_norms(self, slots: torch.Tensor) -> torch.Tensor:
        """L2 norm of each slot's gradient over all layers, as clip_grad_norm_ computes it for one adapter."""
        squares = torch.zeros(len(slots), dtype=torch.float32, device=slots.device)
        for p in self.params:
            if p.grad is not None:
                squares += p.grad[slots].float().pow(2).flatten(1).sum(1)
        return squares.sqrt()

    @torch.no_grad()
    def step(self, slots: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor,
             max_grad_norm: torch.Tensor, norms: torch.Tensor) -> None:
        """One AdamW step for each slot in `slots`, its gradient clipped to `max_grad_norm` given its `norms`."""
        beta1, beta2 = self.betas
        clip = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        self.step_count[slots.cpu()] += 1
        steps = self.step_count[slots.cpu()].to(slots.device)
        step_size = (lr / (1 - beta1**steps)).float()
        bias2_sqrt = (1 - beta2**steps).sqrt().float()
        for p, m_all, v_all in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            grad = p.grad[slots] * clip.view(shape)
            m = m_all[slots].lerp_(grad, 1 - beta1)
            v = v_all[slots].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            m_all[slots] = m
            v_all[slots] = v
            param = p[slots].mul_(1 - (lr * weight_decay).float().view(shape))
            denom = (v.sqrt() / bias2_sqrt.view(shape)).add_(self.eps)
            p[slots] = param.addcdiv_(m * -step_size.view(shape), denom)
