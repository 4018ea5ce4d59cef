"""`relat ask` on a local model folder."""

from __future__ import annotations

import json

from relat_server.cli import main

from .conftest import build_tiny


def test_ask_streams_answer_and_prints_trace(tokenizer, tmp_path, capsys):
    tiny = build_tiny("qwen3", tokenizer)
    tiny.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    code = main(["ask", "What is two plus two?", "--model", str(tmp_path), "--steps", "2", "--latent-steps", "3",
                 "--max-tokens", "4", "--mapping", "soft", "--soft-top-k", "20", "--guidance", "0.5",
                 "--contrastive-eta", "0.25", "--answer-context", "thought"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.strip(), "the answer is printed"
    assert "step 1: loss" in err and "step 2: loss" in err and "reconstruction loss" in err
    assert "answer_context=thought guidance=0.5 contrastive_eta=0.25" in err

    code = main(["ask", "What is two plus two?", "--model", str(tmp_path), "--method", "direct", "--json",
                 "--max-tokens", "3"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["trace"]["method"] == "direct" and result["usage"]["completion_tokens"] <= 3


def test_ask_refuses_bad_parameters(tokenizer, tmp_path, capsys):
    tiny = build_tiny("qwen2", tokenizer)
    tiny.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["ask", "hi", "--model", str(tmp_path), "--steps", "-3"]) == 2
    assert "steps must be" in capsys.readouterr().err
