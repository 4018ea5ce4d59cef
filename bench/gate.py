"""Choose the gate (issue 26) on the search halves, and report it on the confirm halves as it comes out.

A request the gate keeps answers as direct does, token for token (tests/test_gate.py), and one it trains answers as
gate "none" does; so every gate and threshold can be scored from three recorded runs per question, without running
the model again: direct's answer, relat's answer at the defaults (gate none), and the signals the gate reads before
training (l0 and the draft's confidence; recorded by a run whose gate kept every request, so its answers are
direct's too). The records (relat eval's, bench/results/):
  search/search-half, search/confirm-half   direct, latent and relat ("question-lr5e-3", today's default) on the
                                            three knowledge sets of issue 9, split by line parity
  gate/fresh                                direct-signals, relat, latent on knowledge_fresh.jsonl (issue 26)
  gate/signals-knowledge                    direct-signals on the three sets of issue 9
  eval/code, gate/signals-code              direct and relat on the 35 code tasks; the code signals (draft only)

What is chosen, on the search halves (even line indices) alone: each gate's threshold, by accuracy on the
knowledge questions among the thresholds that leave the code tasks' search half no worse than direct (the fewest
trained among ties), and auto's weights (a ridge regression of relat's gain over direct on the standardised signals:
fit_auto). The confirm halves (odd line indices) report the choice.
A simulated gate's seconds are not measured: bench/RESULTS.md's seconds come from running the chosen gate.

    python bench/gate.py            # writes bench/results/gate/choice.json, report.md and sweep.png
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from evaluation.stats import sign_test  # noqa: E402
from evaluation.summary import p_text  # noqa: E402

RESULTS = ROOT / "bench" / "results"
OUT = RESULTS / "gate"
FEATURES = ("l0", "draft_entropy", "draft_margin", "draft_logprob")
GATES = ("fidelity", "confidence", "auto")
KNOWLEDGE = ("knowledge_dev.jsonl", "knowledge_extra.jsonl", "knowledge_kinds.jsonl", "knowledge_fresh.jsonl")


@dataclass
class Question:
    data: str
    index: int
    direct: bool
    relat: bool
    latent: bool | None
    signals: dict[str, float]
    differs: bool  # relat's reply (gate none) is not direct's

    @property
    def half(self) -> str:
        return "search" if self.index % 2 == 0 else "confirm"


def read(folder: Path) -> list[dict]:
    path = RESULTS / folder / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def by_key(records: list[dict], variant: str) -> dict[tuple[str, int], dict]:
    return {(r["data"], r["index"]): r for r in records if r["variant"] == variant and r.get("error") is None}


def questions() -> list[Question]:
    """Every question with direct's, relat's and (knowledge) latent's correctness and the gate's signals."""
    searched = read("search/search-half") + read("search/confirm-half")
    fresh = read("gate/fresh")
    signals = {**by_key(read("gate/signals-knowledge"), "direct-signals"), **by_key(fresh, "direct-signals"),
               **by_key(read("gate/signals-code"), "code-signals")}
    code = read("eval/code")
    direct = {**by_key(searched, "direct"), **by_key(fresh, "direct-signals"), **by_key(code, "direct")}
    relat = {**by_key(searched, "question-lr5e-3"), **by_key(fresh, "relat"), **by_key(code, "relat")}
    latent = {**by_key(searched, "latent"), **by_key(fresh, "latent")}
    found = []
    for key in sorted(direct.keys() & relat.keys() & signals.keys()):
        measured = signals[key]["signals"]
        if not all(name in measured for name in FEATURES):
            continue
        found.append(Question(key[0], key[1], bool(direct[key]["correct"]), bool(relat[key]["correct"]),
                              bool(latent[key]["correct"]) if key in latent else None,
                              {name: measured[name] for name in FEATURES},
                              relat[key]["reply"].strip() != direct[key]["reply"].strip()))
    return found


@dataclass
class Auto:
    """auto's score: bias + sum of weights times the raw signals (the standardisation folded in)."""

    bias: float
    weights: dict[str, float]

    def score(self, signals: dict[str, float]) -> float:
        return self.bias + sum(w * signals[name] for name, w in self.weights.items())


def fit_auto(sample: list[Question], ridge: float = 1.0) -> Auto:
    """Ridge regression of relat's gain over direct (+1 a win, -1 a loss, 0 the same correctness) on the standardised
    signals, over every question of `sample`, in closed form. (A logistic regression of win against loss on the
    questions where the two differ was tried first: on the search halves it kept nearly every request direct, 106
    of 202 against this fit's 111; bench/RESULTS.md, section 18.)"""
    x = np.array([[q.signals[name] for name in FEATURES] for q in sample])
    y = np.array([float(q.relat) - float(q.direct) for q in sample])
    centre, scale = x.mean(0), x.std(0) + 1e-9
    design = np.c_[(x - centre) / scale, np.ones(len(x))]
    solution = np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]), design.T @ y)
    w, b = solution[:-1], float(solution[-1])
    weights = {name: float(wi / si) for name, wi, si in zip(FEATURES, w, scale, strict=True)}
    return Auto(b - float(sum(wi * ci / si for wi, ci, si in zip(w, centre, scale, strict=True))), weights)


def signal(gate: str, q: Question, auto: Auto) -> float:
    if gate == "fidelity":
        return q.signals["l0"]
    if gate == "confidence":
        return math.exp(q.signals["draft_logprob"])
    return auto.score(q.signals)


def trains(gate: str, value: float, threshold: float) -> bool:
    return value < threshold if gate == "confidence" else value > threshold


def score(sample: list[Question], gate: str, threshold: float, auto: Auto) -> dict:
    """The gate at this threshold over the questions: correct, trained, wins and losses against direct and latent."""
    trained = [trains(gate, signal(gate, q, auto), threshold) for q in sample]
    correct = [q.relat if t else q.direct for q, t in zip(sample, trained, strict=True)]
    wins = sum(c and not q.direct for c, q in zip(correct, sample, strict=True))
    losses = sum(q.direct and not c for c, q in zip(correct, sample, strict=True))
    with_latent = [(c, q.latent) for c, q in zip(correct, sample, strict=True) if q.latent is not None]
    latent_wins = sum(c and not lat for c, lat in with_latent)
    latent_losses = sum(lat and not c for c, lat in with_latent)
    differ = sum(t and q.differs for q, t in zip(sample, trained, strict=True))
    return {"n": len(sample), "correct": sum(correct), "trained": sum(trained), "wins": wins, "losses": losses,
            "differ": differ,
            "p": sign_test(wins, losses), "latent_wins": latent_wins, "latent_losses": latent_losses,
            "latent_p": sign_test(latent_wins, latent_losses)}


def candidates(sample: list[Question], gate: str, auto: Auto) -> list[float]:
    """Thresholds between consecutive signal values, and beyond both ends (train all, train none)."""
    values = sorted({signal(gate, q, auto) for q in sample})
    cuts = [(a + b) / 2 for a, b in zip(values, values[1:], strict=False)]
    return [values[0] - 1.0, *cuts, values[-1] + 1.0]


def choose(sample: list[Question], code: list[Question], gate: str, auto: Auto) -> float:
    """The threshold with the most correct on `sample`, among those that leave `code` no worse than direct; the
    fewest trained among ties."""
    allowed = [t for t in candidates(sample, gate, auto) if not code or score(code, gate, t, auto)["losses"] <=
               score(code, gate, t, auto)["wins"]]
    scored = [(score(sample, gate, t, auto), t) for t in allowed]
    best = max(scored, key=lambda pair: (pair[0]["correct"], -pair[0]["trained"]))
    return round(best[1], 4)


def line(name: str, result: dict) -> str:
    latent = (f"+{result['latent_wins']} / −{result['latent_losses']} ({p_text(result['latent_p'])})"
              if result["latent_wins"] + result["latent_losses"] else "–")
    return (f"| {name} | {result['correct']}/{result['n']} | {result['trained']}/{result['n']} "
            f"({result['trained'] / result['n']:.0%}) | +{result['wins']} / −{result['losses']} "
            f"({p_text(result['p'])}) | {latent} | {result['differ']}/{result['n']} |")


def main() -> None:
    found = questions()
    knowledge = [q for q in found if q.data in KNOWLEDGE]
    code = [q for q in found if q.data not in KNOWLEDGE]
    search = [q for q in knowledge if q.half == "search"]
    confirm = [q for q in knowledge if q.half == "confirm"]
    code_search = [q for q in code if q.half == "search"]
    auto = fit_auto(search)
    chosen = {gate: choose(search, code_search, gate, auto) for gate in GATES}
    header = ("| gate (threshold) | correct | trained | vs direct | vs latent | replies ≠ direct |\n"
              "|---|---|---|---|---|---|")
    report = [f"# The gate, chosen on the search halves ({len(search)} knowledge questions), reported on the confirm "
              f"halves ({len(confirm)})", "", "Written by bench/gate.py from recorded runs (its docstring says "
              "which); a gate's answer is direct's where it keeps direct and relat's (gate none) where it trains.",
              "", f"auto's score: {auto.bias:+.4f} " + " ".join(f"{w:+.4f}·{n}" for n, w in auto.weights.items()), ""]
    for title, sample in (("knowledge, search halves (the choice)", search),
                          ("knowledge, confirm halves (as it came out)", confirm),
                          ("code, search half (the choice's constraint: not behind direct)", code_search),
                          ("code, confirm half (as it came out)", [q for q in code if q.half == "confirm"])):
        if not sample:
            continue
        report += [f"## {title}", "", header, line("direct (no training)", score(sample, "fidelity", math.inf, auto)),
                   line("relat, gate none", score(sample, "fidelity", -math.inf, auto))]
        report += [line(f"{gate} ({chosen[gate]:g})", score(sample, gate, chosen[gate], auto)) for gate in GATES]
        report.append("")
        for data in sorted({q.data for q in sample}):
            part = [q for q in sample if q.data == data]
            report.append(f"- {data} ({len(part)}): direct {sum(q.direct for q in part)}, relat "
                          f"{sum(q.relat for q in part)}, " + ", ".join(
                              f"{gate} {score(part, gate, chosen[gate], auto)['correct']} "
                              f"(trained {score(part, gate, chosen[gate], auto)['trained']})" for gate in GATES))
        report.append("")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.md").write_text("\n".join(report) + "\n")
    (OUT / "choice.json").write_text(json.dumps({"thresholds": chosen, "auto": {"bias": auto.bias,
                                                                                 **auto.weights}}, indent=2) + "\n")
    sweep(search, confirm, auto)
    print("\n".join(report))


def sweep(search: list[Question], confirm: list[Question], auto: Auto) -> None:
    """Accuracy against the fraction trained, every threshold of each gate, on each half."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for axis, (title, sample) in zip(axes, (("search halves", search), ("confirm halves", confirm)), strict=True):
        for gate in GATES:
            points = sorted((score(sample, gate, t, auto)["trained"] / len(sample),
                             score(sample, gate, t, auto)["correct"] / len(sample))
                            for t in candidates(search, gate, auto))
            axis.plot(*zip(*points, strict=True), label=gate, linewidth=1.2)
        axis.set_title(f"{title} ({len(sample)} questions)")
        axis.set_xlabel("fraction of requests trained")
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(OUT / "sweep.png", dpi=110)


if __name__ == "__main__":
    main()
