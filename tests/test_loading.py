"""Model loading: local folders, the embedded default, clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from relat_core import ModelLoadError, load_model
from relat_core.latent import LatentMap
from relat_core.loading import EMBEDDED_INSTALL, choose_dtype, embedded_gguf_path

from .conftest import build_tiny


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=EMBEDDED_INSTALL):
        embedded_gguf_path()


def test_local_folder_loads_frozen_in_eval_mode(tokenizer, tmp_path):
    tiny = build_tiny("qwen2", tokenizer)
    tiny.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.name == tmp_path.name
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.dtype == torch.float32


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError):
        load_model(str(tmp_path / "nothing.gguf"))
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        choose_dtype(torch.device("cpu"), "float8")


def test_cpu_defaults_to_fp32():
    assert choose_dtype(torch.device("cpu")) == torch.float32


def test_latent_map_modes(tokenizer):
    model = build_tiny("qwen3", tokenizer).model
    latent_map = LatentMap(model)
    hidden = torch.randn(3, model.config.hidden_size)
    assert torch.equal(latent_map(hidden, "none"), hidden)
    for mapping in ("norm", "realign"):
        norms = latent_map(hidden, mapping).norm(dim=-1)
        torch.testing.assert_close(norms, latent_map.target_norm.expand(3))
    assert not torch.allclose(latent_map(hidden, "norm"), latent_map(hidden, "realign"))
