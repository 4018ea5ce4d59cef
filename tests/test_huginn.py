"""Huginn (relat_core.models.huginn) on tiny random checkpoints that the tests write in huginn-0125's own layout:
config.json with the fields of `raven_config_minimal.json` and model.safetensors with the published tensor names.

Checked: the layout loads (and a wrong one is refused), a cached batched decode equals a full forward, the cache reads
a position that stopped early at its latest step, adaptive exit stops early where it must and never runs past
num_steps, and batched rows of different depths get what they would alone.
"""

from __future__ import annotations

import copy

import pytest
import torch

from relat_core import ModelLoadError, load_model
from relat_core.models.huginn import HuginnConfig, HuginnForCausalLM, HuginnLoadError, is_huginn_folder, load_huginn

from .huginn_support import (
    FIXED,
    HEADS,
    STEPS,
    VOCAB,
    WIDTH,
    model_from_folder,
    published_config,
    published_tensors,
    write_checkpoint,
)
from .server_support import one_torch_thread


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():  # the tiny models are faster on one thread, and the machine is shared
        yield


@pytest.fixture(scope="module")
def huginn(tmp_path_factory) -> HuginnForCausalLM:
    return model_from_folder(write_checkpoint(tmp_path_factory.mktemp("huginn"), published_tensors(VOCAB), VOCAB))


@pytest.fixture(scope="module")
def state_independent(huginn) -> HuginnForCausalLM:
    """A constructed case where every exit criterion must fire: the adapter ignores the state (its state half is
    zero), so every recurrence from the first on returns exactly the same state and prediction."""
    model = copy.deepcopy(huginn)
    model.transformer["adapter"].weight[:, :WIDTH] = 0
    return model


def token_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_in_pieces(model: HuginnForCausalLM, ids: torch.Tensor, cuts: list[int], steps, **options):
    """Prefill ids[:, :cuts[0]], then feed the rest in the pieces `cuts` marks, through one cache. `steps`: an int,
    per row, or per position (B, T), sliced along with the ids. Returns (logits, recurrences, cache)."""
    cache = model.new_cache()
    logits, used = [], []
    bounds = [0, *cuts, ids.shape[1]]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        piece_steps = steps[:, start:stop] if isinstance(steps, torch.Tensor) and steps.dim() == 2 else steps
        out = model(ids[:, start:stop], cache=cache, num_steps=piece_steps, **options)
        logits.append(out.logits)
        used.append(out.recurrences)
    return torch.cat(logits, dim=1), torch.cat(used, dim=1), cache


# -- loading --------------------------------------------------------------------------------------------------------


def test_published_layout_loads_with_its_tokenizer(tmp_path, tokenizer):
    tensors = published_tensors(len(tokenizer))
    folder = write_checkpoint(tmp_path / "raven", tensors, len(tokenizer))
    tokenizer.save_pretrained(folder)
    assert is_huginn_folder(folder) and not is_huginn_folder(tmp_path)

    model, loaded_tokenizer = load_huginn(folder)
    assert len(loaded_tokenizer) == len(tokenizer)
    state = model.state_dict()
    assert set(state) - {"lm_head.weight"} == set(tensors)  # no freqs_cis needed: it is recomputed
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name
    assert model.lm_head.weight is model.transformer["wte"].weight  # tied
    assert model.dtype == torch.float32 and not model.training
    assert model.config.mean_recurrence == STEPS and model.config.extra["architectures"] == ["RavenForCausalLM"]

    loaded = load_model(str(folder), device="cpu")  # the loading hook: relat's own module, frozen
    assert isinstance(loaded.model, HuginnForCausalLM)
    assert loaded.name == "raven" and not any(p.requires_grad for p in loaded.model.parameters())


def test_stored_freqs_cis_and_head_are_ignored(tmp_path, huginn):
    tensors = published_tensors(VOCAB)
    tensors["freqs_cis"] = torch.randn(1, 256, 1, WIDTH // HEADS // 2, 2)  # the reference saves its rotary buffer
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    model = model_from_folder(write_checkpoint(tmp_path, tensors, VOCAB))
    ids = token_ids(1, 5)
    torch.testing.assert_close(model(ids, **FIXED).logits, huginn(ids, **FIXED).logits, rtol=0, atol=0)


def test_a_different_layout_is_refused(tmp_path):
    tensors = published_tensors(VOCAB)
    tensors["transformer.core_block.0.attn.c_attn.weight"] = tensors.pop("transformer.core_block.0.attn.Wqkv.weight")
    folder = write_checkpoint(tmp_path, tensors, VOCAB)
    with pytest.raises(HuginnLoadError, match="core_block.0.attn.Wqkv"):
        model_from_folder(folder)
    with pytest.raises(ModelLoadError, match="Huginn"):
        load_model(str(folder), device="cpu")


def test_published_config_is_read_as_huginn_0125():
    config = HuginnConfig.from_dict({**published_config(65536), "n_embd": 5280, "num_attention_heads": 55,
                                     "num_key_value_heads": 55, "intermediate_size": 17920, "mean_recurrence": 32,
                                     "block_size": 4096})
    assert (config.head_dim, config.rope_base, config.embed_scale) == (96, 50_000, pytest.approx(5280 ** 0.5))
    assert config.to_dict()["num_attention_heads"] == 55 and "auto_map" in config.to_dict()
    with torch.device("meta"):
        parameters = sum(p.numel() for p in HuginnForCausalLM(config).parameters())
    assert 3.5e9 < parameters < 3.6e9  # huginn-0125 is a 3.5B model


# -- depth, cache, exits --------------------------------------------------------------------------------------------


def test_cached_batched_decode_equals_full_forward(huginn):
    ids = token_ids(2, 9)
    full = huginn(ids, **FIXED)
    logits, used, cache = decode_in_pieces(huginn, ids, [5, 6, 8], STEPS, init_scale=0.0)  # 1- and 2-token pieces
    torch.testing.assert_close(logits, full.logits, rtol=1e-4, atol=1e-5)
    assert (used == STEPS).all() and (full.recurrences == STEPS).all()
    # One entry per (block, recurrence step): 2 prelude blocks, 4 core layers x 4 steps, 2 coda blocks.
    assert cache.length == 9 and len(cache.prelude) == 2 and len(cache.coda) == 2
    assert [len(steps) for steps in cache.core_steps] == [STEPS] * 4
    assert cache.prelude[0][0].shape == (2, HEADS, 9, WIDTH // HEADS)


def test_init_scale_zero_is_deterministic(huginn):
    ids = token_ids(1, 4)
    first = huginn(ids, num_steps=2, init_scale=0.0, generator=torch.Generator().manual_seed(1)).logits
    second = huginn(ids, num_steps=2, init_scale=0.0, generator=torch.Generator().manual_seed(2)).logits
    assert torch.equal(first, second)
    noisy = huginn(ids, num_steps=2, init_scale=1.0, generator=torch.Generator().manual_seed(1)).logits
    assert not torch.allclose(first, noisy)


def test_positions_that_stopped_early_are_read_at_their_latest_step(huginn):
    ids = token_ids(2, 8)
    steps = torch.tensor([[3, 3, 3, 3, 6, 2, 5, 1], [2, 2, 2, 2, 4, 4, 7, 3]])
    full = huginn(ids, num_steps=steps, init_scale=0.0)
    logits, used, cache = decode_in_pieces(huginn, ids, [4, 5, 6, 7], steps, init_scale=0.0)
    assert torch.equal(full.recurrences, steps) and torch.equal(used, steps)
    torch.testing.assert_close(logits, full.logits, rtol=1e-4, atol=1e-5)
    # The lookup itself: a query at step 5 reads position 5 of row 0 (2 steps) at its step 1, position 4 (6 steps)
    # at step 5, for every core layer.
    assert torch.equal(cache.depth, steps) and len(cache.core_steps[0]) == 7
    for layer in range(4):
        keys, _ = cache.core_lookup(layer, 5)
        assert torch.equal(keys[0, :, 5], cache.core_steps[layer][1][0][0, :, 5])
        assert torch.equal(keys[0, :, 4], cache.core_steps[layer][5][0][0, :, 4])
        assert torch.equal(keys[0, :, 4], cache.core_latest[layer][0][0, :, 4])


@pytest.mark.parametrize(("criterion", "threshold", "expected"), [
    ("latent-diff", None, 2),  # the state stops changing at step 2
    ("kl", None, 2),  # the prediction stops changing at step 2 (step 1 compares against the uniform distribution)
    ("argmax-stability", 3, 4),  # the same argmax at steps 1 to 4: stable for 3 successive steps
])
def test_adaptive_exit_stops_where_the_criterion_must_fire(state_independent, criterion, threshold, expected):
    ids = token_ids(2, 6)
    options = dict(init_scale=0.0, exit_criterion=criterion, exit_threshold=threshold)
    with torch.no_grad():  # exits apply to forwards without gradient
        full = state_independent(ids, num_steps=8, **options)
        assert (full.recurrences <= expected).all() and (full.recurrences >= 1).all()
        if criterion != "kl":  # KL against the uniform distribution may already be small at step 1
            assert (full.recurrences == expected).all()
        _, used, _ = decode_in_pieces(state_independent, ids, [4, 5], 8, **options)
        assert torch.equal(used, full.recurrences)
    # A forward that records a gradient (a training forward) runs every position its full depth, as Huginn trained.
    assert (state_independent(ids, num_steps=8, **options).recurrences == 8).all()
    # Stopping changed nothing here: the state is the one a fixed depth gives.
    torch.testing.assert_close(full.logits, state_independent(ids, num_steps=8, init_scale=0.0).logits)


@pytest.mark.parametrize(("criterion", "threshold"), [
    ("latent-diff", 0.0),  # never fires: runs num_steps
    ("kl", 1e9),  # fires at once: one step
    ("argmax-stability", None),
    ("latent-diff", None),
])
@torch.no_grad()  # exits apply to forwards without gradient
def test_adaptive_exit_never_exceeds_num_steps(huginn, criterion, threshold):
    ids = token_ids(2, 6)
    rows = torch.tensor([3, 6])
    out = huginn(ids, num_steps=rows, init_scale=0.0, exit_criterion=criterion, exit_threshold=threshold)
    assert (out.recurrences >= 1).all() and (out.recurrences <= rows[:, None]).all()
    if threshold == 0.0:
        assert torch.equal(out.recurrences, rows[:, None].expand(2, 6))
    if threshold == 1e9:
        assert (out.recurrences == 1).all()


@pytest.mark.parametrize("exit_options", [{}, {"exit_criterion": "argmax-stability", "exit_threshold": 2}])
@torch.no_grad()
def test_batched_equals_alone_for_rows_of_different_depths(huginn, exit_options):
    ids = token_ids(2, 8, seed=3)
    rows = [2, 5]
    batched, batched_used, _ = decode_in_pieces(huginn, ids, [6, 7], rows, init_scale=0.0, **exit_options)
    for row, depth in enumerate(rows):
        alone, alone_used, _ = decode_in_pieces(huginn, ids[row:row + 1], [6, 7], depth, init_scale=0.0,
                                                **exit_options)
        torch.testing.assert_close(batched[row:row + 1], alone, rtol=1e-4, atol=1e-5)
        assert torch.equal(batched_used[row:row + 1], alone_used)
        assert (alone_used <= depth).all()


def test_left_padded_row_with_a_mask_equals_the_row_alone(huginn):
    """The engine's batches: explicit masks and positions, padding invisible and consuming no position."""
    ids = token_ids(1, 5)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], dim=1)
    valid = torch.tensor([[False, False, True, True, True, True, True]])
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    allowed = (causal & valid[:, None, :]) | torch.eye(7, dtype=torch.bool)  # a padding query sees itself
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    out = huginn(padded, attention_mask=allowed, position_ids=positions, **FIXED)
    torch.testing.assert_close(out.logits[:, 2:], huginn(ids, **FIXED).logits, rtol=1e-4, atol=1e-5)
