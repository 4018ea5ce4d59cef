"""Tiny random Huginn checkpoints written in huginn-0125's own layout: config.json with the fields of
`raven_config_minimal.json` and model.safetensors with the published tensor names (tests/test_huginn.py,
tests/test_huginn_engine.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from relat_core.models.huginn import HuginnConfig, HuginnForCausalLM, load_huginn_weights

WIDTH, HEADS, INTERMEDIATE, VOCAB = 32, 4, 48, 256
STEPS = 4  # the tiny config's mean_recurrence
FIXED = dict(num_steps=STEPS, init_scale=0.0)  # deterministic: a zero initial state


def published_config(vocab_size: int) -> dict:
    """raven_config_minimal.json's fields, with tiny sizes (the block structure is huginn-0125's: 2, 4, 2)."""
    return {
        "name": "tiny-raven", "architectures": ["RavenForCausalLM"],
        "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig",
                     "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"},
        "torch_dtype": "float32", "model_type": "huginn_raven", "block_size": 256, "vocab_size": vocab_size,
        "padding_multiple": 64, "tie_embeddings": True, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
        "n_embd": WIDTH, "intermediate_size": INTERMEDIATE, "bias": False, "architecture_class_name": "RecurrentGPT",
        "block_class_name": "SandwichBlock", "norm_class_name": "RMSNorm_llama", "norm_eps": 1e-6,
        "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU", "init_strategy": "takase", "init_orthogonal": False,
        "state_init": "like-init", "injection_type": "linear", "n_layers_in_recurrent_block": 4,
        "mean_recurrence": STEPS, "sampling_scheme": "poisson-lognormal-filling", "mean_backprop_depth": 2,
        "n_layers_in_prelude": 2, "n_layers_in_coda": 2, "qk_bias": True,
        "activation_checkpoint_impl": "per-iteration",
    }


def published_tensors(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a huginn-0125 checkpoint, named and shaped as published (written out here, independently of
    the module, so that a renamed parameter fails the test); random values at the scale of the takase init."""
    generator = torch.Generator().manual_seed(seed)
    std = (2 / (5 * WIDTH)) ** 0.5

    def random(*shape: int, scale: float = std) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    tensors = {"transformer.wte.weight": random(vocab_size, WIDTH),
               "transformer.adapter.weight": random(WIDTH, 2 * WIDTH),
               "transformer.ln_f.weight": 1 + random(WIDTH, scale=0.1)}
    for part in ("prelude", "core_block", "coda"):
        for index in range(4 if part == "core_block" else 2):
            prefix = f"transformer.{part}.{index}."
            for norm in range(1, 5):
                tensors[f"{prefix}norm_{norm}.weight"] = 1 + random(WIDTH, scale=0.1)
            tensors[prefix + "attn.Wqkv.weight"] = random(3 * WIDTH, WIDTH)
            tensors[prefix + "attn.qk_bias"] = random(2, 1, HEADS, WIDTH // HEADS, scale=0.1)
            tensors[prefix + "attn.proj.weight"] = random(WIDTH, WIDTH)
            tensors[prefix + "mlp.fc.weight"] = random(2 * INTERMEDIATE, WIDTH)
            tensors[prefix + "mlp.proj.weight"] = random(WIDTH, INTERMEDIATE)
    return tensors


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], vocab_size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(published_config(vocab_size)))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def model_from_folder(folder: Path) -> HuginnForCausalLM:
    """The loader's weight path without a tokenizer (the model-only tests use a 256-token vocabulary)."""
    with torch.device("meta"):
        model = HuginnForCausalLM(HuginnConfig.from_folder(folder))
    load_huginn_weights(model, folder, torch.device("cpu"), torch.float32)
    return model.eval().requires_grad_(False)
