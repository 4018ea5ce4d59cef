"""The slot adapter against its references: peft's LoRA for the forward, torch's AdamW for the update."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from relat_core.latent import SequenceState, extend
from relat_core.lora import SlotBank

from .conftest import build_tiny


def _random_slot(bank: SlotBank, slot: int, rank: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in bank.layers:
            layer.A[slot, :rank] = torch.randn(layer.A[slot, :rank].shape, generator=generator) * 0.1
            layer.B[slot, :, :rank] = torch.randn(layer.B[slot, :, :rank].shape, generator=generator) * 0.1


def test_slot_matches_peft_lora(tokenizer):
    """A slot holding A and B computes exactly what peft's LoRA with the same A and B computes."""
    loaded = build_tiny("qwen3", tokenizer)
    reference = copy.deepcopy(loaded.model)
    targets = ("q_proj", "v_proj", "down_proj")
    bank = SlotBank(loaded.model, num_slots=2, max_rank=8, targets=targets)
    _random_slot(bank, slot=1, rank=4, seed=0)

    peft_model = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                      lora_dropout=0.0))
    layers = {(layer.kind, i // len(targets)): layer for i, layer in enumerate(bank.layers)}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                kind = name.rsplit(".", 1)[-1]
                layer_index = int(name.split(".layers.")[1].split(".")[0])
                slot_layer = layers[(kind, layer_index)]
                module.lora_A["default"].weight.copy_(slot_layer.A[1, :4])
                module.lora_B["default"].weight.copy_(slot_layer.B[1, :, :4])

    ids = torch.tensor([[5, 17, 99, 300, 7]])
    with torch.no_grad(), bank.bind([1], [8 / 4], targets, rank=4):
        ours = loaded.model(input_ids=ids).logits
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        base = loaded.model(input_ids=ids).logits  # unbound: the base model
    assert not torch.allclose(ours, base, atol=1e-4), "the adapter must change the output"
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_slots_in_one_batch_equal_each_alone(tokenizer):
    """Two rows bound to different slots, one left-padded, give the same hidden states as each run alone."""
    loaded = build_tiny("qwen2", tokenizer)
    model = loaded.model
    bank = SlotBank(model, num_slots=2, max_rank=8)
    _random_slot(bank, 0, 8, seed=1)
    _random_slot(bank, 1, 4, seed=2)
    long, short = [11, 12, 13, 14, 15, 16], [21, 22, 23]

    def alone(ids: list[int], slot: int) -> torch.Tensor:
        state = SequenceState.empty(model, 1, torch.device("cpu"))
        with torch.no_grad(), bank.bind([slot], [2.0], bank.kinds):
            first = extend(model, state, input_ids=torch.tensor([ids]))[:, -1]
            second = extend(model, state, input_ids=torch.tensor([[7]]))[:, -1]
        return torch.cat([first, second])

    state = SequenceState.empty(model, 2, torch.device("cpu"))
    padded = torch.tensor([long, [0] * 3 + short])
    valid = torch.tensor([[True] * 6, [False] * 3 + [True] * 3])
    with torch.no_grad(), bank.bind([0, 1], [2.0, 2.0], bank.kinds):
        first = extend(model, state, input_ids=padded, valid=valid)[:, -1]
        second = extend(model, state, input_ids=torch.tensor([[7], [7]]))[:, -1]
    torch.testing.assert_close(torch.stack([first[0], second[0]]), alone(long, 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack([first[1], second[1]]), alone(short, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_slot_adamw_matches_torch_adamw(tokenizer, weight_decay):
    """Per-slot AdamW with clipping equals torch.optim.AdamW + clip_grad_norm_ on that slot alone,
    while another slot that started earlier is stepped in the same calls."""
    loaded = build_tiny("qwen3", tokenizer)
    bank = SlotBank(loaded.model, num_slots=2, max_rank=4, targets=("q_proj", "o_proj"))
    _random_slot(bank, 0, 4, seed=3)
    _random_slot(bank, 1, 4, seed=4)
    reference = [p[1].detach().clone().requires_grad_() for p in bank.parameters()]
    torch_opt = torch.optim.AdamW(reference, lr=1e-2, weight_decay=weight_decay)
    optimizer = bank.optimizer
    generator = torch.Generator().manual_seed(5)
    optimizer.step_count[0] = 7  # slot 0 is further along: per-slot bias correction must keep them apart
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=generator) * 3 for p in bank.parameters()]
        for p, g in zip(bank.parameters(), grads, strict=True):
            p.grad = g.clone()
        slots = torch.tensor([0, 1])
        norms = optimizer.grad_norms(slots)
        optimizer.step(slots, torch.tensor([5e-3, 1e-2]), torch.full((2,), weight_decay),
                       torch.tensor([1.0, 1.0]), norms)
        for p, g in zip(reference, grads, strict=True):
            p.grad = g[1].clone()
        torch_norm = torch.nn.utils.clip_grad_norm_(reference, 1.0)
        torch_opt.step()
        torch.testing.assert_close(norms[1], torch_norm, atol=1e-4, rtol=1e-5)
    for ours, theirs in zip(bank.parameters(), reference, strict=True):
        torch.testing.assert_close(ours[1].detach(), theirs.detach(), atol=1e-6, rtol=1e-5)


def test_rank_below_max_stays_low_rank(tokenizer):
    """Rows of A past a request's rank are zero after reset and stay zero through training steps."""
    loaded = build_tiny("qwen3", tokenizer)
    bank = SlotBank(loaded.model, num_slots=1, max_rank=8)
    bank.reset(0, rank=2, targets=("q_proj",), generator=torch.Generator().manual_seed(0))
    for layer in bank.layers:
        assert not layer.B.any()
        assert layer.A[0, :2].any() == (layer.kind == "q_proj")
        assert not layer.A[0, 2:].any()
    ids = torch.tensor([[3, 4, 5, 6]])
    for _ in range(3):
        bank.zero_grad()
        with bank.bind([0], [1.0], ("q_proj",)):
            loaded.model(input_ids=ids).logits.pow(2).mean().backward()
        slots = torch.tensor([0])
        bank.optimizer.step(slots, torch.tensor([1e-2]), torch.zeros(1), torch.ones(1),
                            bank.optimizer.grad_norms(slots))
    for layer in bank.layers:
        assert not layer.A[0, 2:].any() and not layer.B[0, :, 2:].any()
        assert layer.B[0].any() == (layer.kind == "q_proj")
