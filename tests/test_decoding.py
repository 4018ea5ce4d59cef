"""Incremental detokenisation: multi-byte characters are never split, stop strings never leak."""

from __future__ import annotations

import pytest

from relat_core.decoding import IncrementalDetokenizer

TEXT = "Grüße aus Köln 🌍🚀 — 日本語のテキスト, naïve café ∑x² ok."


def stream(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detokenizer = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        deltas.append(detokenizer.push(token))
        if detokenizer.stopped:
            break
    deltas.append(detokenizer.finish())
    return deltas, detokenizer


def test_multibyte_text_streams_whole_characters(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    # The premise: single tokens of this text decode to broken characters on their own.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    deltas, detokenizer = stream(tokenizer, TEXT)
    assert "".join(deltas) == tokenizer.decode(ids) == detokenizer.text
    assert not any("\ufffd" in delta for delta in deltas)


@pytest.mark.parametrize("stop", ["日本", "Köln 🌍", "ok."])
def test_stop_string_cuts_text_and_is_never_emitted(tokenizer, stop):
    deltas, detokenizer = stream(tokenizer, TEXT, (stop, "never appears"))
    emitted = "".join(deltas)
    assert detokenizer.stopped
    assert emitted == TEXT[:TEXT.index(stop)]
    assert stop not in emitted


def test_held_back_prefix_of_a_stop_string_is_released_at_the_end(tokenizer):
    deltas, detokenizer = stream(tokenizer, "the end is nigh", ("nigh!",))
    assert not detokenizer.stopped
    assert "".join(deltas) == "the end is nigh"
    assert "nigh" not in "".join(deltas[:-1]), "a possible stop prefix is held back until the end"
