"""Answers of one `relat eval` run per weight format against fp32's, question by question (issue 29, item 4).

What it reads and why: `relat eval --weights int8` (or int4) answers the same items as the fp32 run, with the same
variants. Whether a format is "not worse" is a paired question: this script pairs each variant's records of a format
with fp32's on the same item and gives the correct counts, wins and losses with the exact sign test
(evaluation/stats.py), the replies identical to fp32's, how many requests trained in each, and the largest
difference in the reconstruction loss before training (l0, which the fidelity gate reads) and after it (l_N).

    python bench/formats.py bench/results/quantized/eval-confirm     # folders fp32/, int8/, int4/ inside
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.records import read_records  # noqa: E402
from evaluation.stats import by_item, pair  # noqa: E402


def largest_difference(results: dict, baseline: dict, field: str) -> float | None:
    gaps = [abs(results[k][field] - baseline[k][field]) for k in results.keys() & baseline.keys()
            if results[k].get(field) is not None and baseline[k].get(field) is not None]
    return max(gaps) if gaps else None


def trained(records: dict, items: set) -> int:
    return sum(1 for key in items if (records[key].get("steps_run") or 0) > 0)


def compare(root: Path, formats: list[str]) -> list[dict]:
    baseline_records = read_records(root / "fp32")
    rows = []
    variants = sorted({r["variant"] for r in baseline_records})
    for fmt in formats:
        records = read_records(root / fmt)
        for variant in variants:
            base, own = by_item(baseline_records, variant), by_item(records, variant)
            if not own:
                continue
            paired = pair(own, base)
            rows.append({"format": fmt, "variant": variant, "items": paired.shared,
                         "fp32_correct": sum(bool(base[k].get("correct")) for k in own.keys() & base.keys()),
                         "correct": sum(bool(own[k].get("correct")) for k in own.keys() & base.keys()),
                         "wins": paired.wins, "losses": paired.losses, "p": paired.p,
                         "identical": paired.shared - paired.differ,
                         "trained": (trained(base, own.keys() & base.keys()),
                                     trained(own, own.keys() & base.keys())),
                         "l0_gap": largest_difference(own, base, "recon_before"),
                         "lN_gap": largest_difference(own, base, "recon_after")})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| format | variant | items | fp32 correct | correct | against fp32 (sign test) | replies identical | "
             "trained (fp32, format) | largest \\|l0\\| / \\|l_N\\| difference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gaps = " / ".join("–" if g is None else f"{g:.3f}" for g in (r["l0_gap"], r["lN_gap"]))
        lines.append(f"| {r['format']} | {r['variant']} | {r['items']} | {r['fp32_correct']} | {r['correct']} | "
                     f"+{r['wins']} / −{r['losses']} (p = {r['p']:.2f}) | {r['identical']} / {r['items']} | "
                     f"{r['trained'][0]}, {r['trained'][1]} | {gaps} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a folder holding one relat eval folder per format (fp32/, ...)")
    parser.add_argument("--formats", nargs="+", default=None, help="default: every folder but fp32")
    args = parser.parse_args(argv)
    formats = args.formats or sorted(p.name for p in args.root.iterdir() if p.is_dir() and p.name != "fp32")
    rows = compare(args.root, formats)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
