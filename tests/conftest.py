"""Shared fixtures: tiny random Qwen3 / Qwen2 models (milliseconds per forward) and the embedded SmolLM2.

Tiny models use the embedded model's tokenizer (its chat template is ChatML, as Qwen's is), so no test needs a
model hub. The embedded model is converted once into the cache (about 20 s on a fresh machine), then reloads fast.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from relat_core import Engine, LoadedModel, load_model, prepare
from relat_core.loading import EMBEDDED_MODEL, cache_dir, convert_gguf, embedded_gguf_path

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def embedded_folder() -> str:
    return str(convert_gguf(embedded_gguf_path(), cache_dir() / EMBEDDED_MODEL))


@pytest.fixture(scope="session")
def tokenizer(embedded_folder):
    return AutoTokenizer.from_pretrained(embedded_folder)


def build_tiny(architecture: str, tokenizer, seed: int = 0, pack_weights: bool = True) -> LoadedModel:
    """A randomly initialised model of the given family, fp32 on CPU (its linear layers packed, as served)."""
    config = AutoConfig.for_model(architecture, vocab_size=len(tokenizer), **TINY,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if architecture == "qwen3":
        config.head_dim = 8
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return prepare(model, tokenizer, f"tiny-{architecture}", "cpu", pack_weights)


def save_tiny(folder, tokenizer, seed: int):
    """A tiny Qwen3 saved as a model folder, for tests that start `relat serve --model FOLDER` in a process."""
    loaded = build_tiny("qwen3", tokenizer, seed=seed)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=["qwen3", "qwen2"])
def tiny(request, tokenizer) -> LoadedModel:
    return build_tiny(request.param, tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen3(tokenizer) -> LoadedModel:
    return build_tiny("qwen3", tokenizer)


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    return load_model(EMBEDDED_MODEL, device="cpu")


@pytest.fixture(scope="session")
def smol_engine(smol) -> Engine:
    return Engine(smol)


def train_alone(engine: Engine, segments, ttt, slot: int):
    """Train one adapter slot on these segments through the engine's batched training step (a batch of one);
    returns the engine's record of it (its trace, steps and final state)."""
    from relat_core.engine import SamplingParams, Trace, _Sequence

    sequence = _Sequence("test", segments, ttt, SamplingParams(), Trace("relat", ttt.latent_steps, False), 0.0,
                         slot=slot, phase="train")
    while sequence.phase == "train":
        engine.trainer.run([sequence])
    return sequence
