"""Loading and saving Huginn folders in huginn-0125's published layout (config.json with model_type huginn_raven,
safetensors with the checkpoint's tensor names; arXiv 2502.05171, the project seal-rg/recurrent-pretraining).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import HUGINN_MODEL_TYPE, HuginnConfig, HuginnLoadError
from .model import HuginnForCausalLM

# Buffers the reference saves with the weights but that are a function of the config: recomputed, never loaded.
RECOMPUTED_BUFFERS = ("freqs_cis",)


def is_huginn_folder(path: str | Path) -> bool:
    """A local folder whose config.json says model_type huginn_raven."""
    config_file = Path(path) / "config.json"
    try:
        data = json.loads(config_file.read_text()) if config_file.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") == HUGINN_MODEL_TYPE


def weight_files(folder: str | Path) -> list[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json names, or every *.safetensors file."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HuginnLoadError(f"no safetensors weights in {folder}")
    return files


def load_huginn_weights(model: HuginnForCausalLM, folder: str | Path, device: torch.device,
                        dtype: torch.dtype) -> None:
    """Read the checkpoint's tensors into `model` (built on the meta device: nothing is allocated twice),
    checking that the names and shapes are exactly the architecture's."""
    from safetensors import safe_open

    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    tied = model.config.tie_embeddings
    if tied:
        expected.pop("lm_head.weight")  # the embedding; a checkpoint that also holds it has it twice
    state: dict[str, Tensor] = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for name in reader.keys():
                if name.split(".")[-1] in RECOMPUTED_BUFFERS or (tied and name == "lm_head.weight"):
                    continue
                state[name] = reader.get_tensor(name).to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HuginnLoadError(f"weights in {folder} do not match Huginn's layout: missing {missing[:5]} "
                              f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    wrong = [f"{name} {tuple(state[name].shape)} != {tuple(shape)}" for name, shape in expected.items()
             if state[name].shape != shape]
    if wrong:
        raise HuginnLoadError(f"weights in {folder} have the wrong shapes for config.json: {wrong[:5]}")
    if tied:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign replaced the parameters: tie the new ones


def load_huginn(folder: str | Path, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> tuple[HuginnForCausalLM, Any]:
    """(model in eval mode, tokenizer) from a Huginn folder: fp32 on CPU, bf16 on a GPU unless `dtype` says."""
    from transformers import AutoTokenizer

    torch_device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    config = HuginnConfig.from_folder(folder)
    config._name_or_path = str(folder)
    with torch.device("meta"):
        model = HuginnForCausalLM(config)
    load_huginn_weights(model, folder, torch_device, dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def save_huginn(model: HuginnForCausalLM, folder: str | Path) -> None:
    """config.json and model.safetensors in the published layout (the tied head and no freqs_cis stored)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()
               if not (model.config.tie_embeddings and name == "lm_head.weight")}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
