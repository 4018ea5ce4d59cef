"""A request's trained adapter, kept: its slot's rank-r slice copied off the device, in PEFT's LoRA format.

PEFT (huggingface/peft) saves a LoRA adapter as two files: `adapter_config.json`, a `LoraConfig`, and
`adapter_model.safetensors`, whose keys are `base_model.model.<module path>.lora_A.weight` (r, in) and
`base_model.model.<module path>.lora_B.weight` (out, r), without the adapter's name. PEFT adds
`(lora_alpha / r) * B A x` to a layer's output, and a slot adds `(alpha / rank) * B A x` (relat_core/lora.py): the
same A, B and scale, so `PeftModel.from_pretrained(base, folder)` computes what the request's adapter computed
(tests/test_adapter_export.py checks the logits).

What one costs: rank * (in + out) fp32 numbers, 4 bytes each, for every adapted linear layer (`adapter_bytes`);
the slot's rows past the rank are zero and not kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from .lora import SlotBank

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterExport:
    """An adapter in PEFT's format: its state dict (fp32, on the CPU) and its adapter_config.json."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def summary(self) -> dict[str, Any]:
        """What the trace says of it."""
        return {"rank": self.config["r"], "alpha": self.config["lora_alpha"],
                "targets": list(self.config["target_modules"]), "bytes": self.nbytes}

    def files(self) -> dict[str, bytes]:
        """The folder PEFT loads, as file name -> content."""
        return {CONFIG_FILE: json.dumps(self.config, indent=2).encode(),
                WEIGHTS_FILE: safetensors_bytes(self.tensors, metadata={"format": "pt"})}

    def save(self, folder: str | Path) -> Path:
        """Write the folder (created if need be); `PeftModel.from_pretrained(base_model, folder)` loads it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in self.files().items():
            (folder / name).write_bytes(content)
        return folder


def adapter_bytes(bank: SlotBank, rank: int, targets: tuple[str, ...] | list[str]) -> int:
    """The bytes of an export of this rank on these targets: rank * (in + out) * 4 per adapted linear layer."""
    return sum(rank * (layer.A.shape[-1] + layer.B.shape[1]) * 4 for layer in bank.layers if layer.kind in targets)


@torch.no_grad()
def export_adapter(bank: SlotBank, slot: int, rank: int, alpha: float, targets: tuple[str, ...] | list[str],
                   base_model: str) -> AdapterExport:
    """A copy of slot `slot`'s adapter (its first `rank` rows of A, columns of B, on the `targets` layers), to keep
    after the slot is released; the copies share nothing with the bank."""
    tensors: dict[str, torch.Tensor] = {}
    for layer, pair in zip(bank.layers, bank.snapshot(slot, rank, targets), strict=True):
        if pair is not None:
            key = f"base_model.model.{layer.name}"
            # On the CPU already copies (the snapshot clones: the next request overwrites the slot).
            tensors[f"{key}.lora_A.weight"] = pair[0].cpu().contiguous()  # (r, in)
            tensors[f"{key}.lora_B.weight"] = pair[1].cpu().contiguous()  # (out, r)
    kinds = [kind for kind in dict.fromkeys(layer.kind for layer in bank.layers) if kind in targets]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,  # PEFT's scale: alpha / r
        "target_modules": kinds, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None,
    }
    return AdapterExport(tensors, config)
