"""Multiple choice scored by generation against loglikelihood (bench/RESULTS.md, section 19): reads the records of
the two `relat eval` runs and prints, per variant, the accuracy of each scoring, the loglikelihood accuracy under
lm-eval's other normalisation (per character, its acc_norm, computed from the records' option scores), and how
often the two scorings agree on an item. Nothing is chosen from these numbers.

    python bench/loglik.py bench/results/loglik/generation bench/results/loglik/loglik
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LETTERS = "ABCDEFGHIJ"


def records(folder: Path) -> dict[tuple[int, str], dict]:
    lines = (folder / "records.jsonl").read_text(encoding="utf-8").splitlines()
    return {(r["index"], r["variant"]): r for r in map(json.loads, lines) if r.get("error") is None}


def per_char(record: dict) -> str:
    """The option with the highest loglikelihood per character of its text (lm-eval's acc_norm)."""
    scores = [o["logprob"] / max(o["chars"], 1) for o in record["option_scores"]]
    return LETTERS[max(range(len(scores)), key=scores.__getitem__)]


def main(generation: Path, loglik: Path) -> None:
    generated, scored = records(generation), records(loglik)
    variants = list(dict.fromkeys(variant for _, variant in scored))
    print("| variant | generation | loglik (sum) | loglik (per char) | items both scorings right / wrong / split |")
    print("|---|---|---|---|---|")
    for variant in variants:
        items = sorted(index for index, name in scored if name == variant and (index, name) in generated)
        gen = [generated[index, variant]["correct"] for index in items]
        ll = [scored[index, variant]["correct"] for index in items]
        norm = [per_char(scored[index, variant]) == scored[index, variant]["gold"] for index in items]
        both = sum(g and s for g, s in zip(gen, ll, strict=True))
        neither = sum(not g and not s for g, s in zip(gen, ll, strict=True))
        n = len(items)
        print(f"| {variant} | {sum(gen)}/{n} | {sum(ll)}/{n} | {sum(norm)}/{n} | {both} / {neither} / "
              f"{n - both - neither} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
