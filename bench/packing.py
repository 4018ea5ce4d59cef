"""Packed against plain linear layers (relat_core/packing.py, issue 15): how fast each of the model's products runs
at the row counts relat uses, and whether the answers stay as they were.

1. products: every distinct linear shape of the model (q, k, v, o, gate, up, down, LM head) at 1, 8, 64 and 512
   rows, torch's linear (MKL) against the oneDNN-packed weight; the best of three timings of a loop each.
   decode steps: whole-model one-token steps over a 100-token cache at 1 and 8 rows, where the weights stream from
   memory as they do in the engine: every layer plain, every layer packed, and as shipped (a single row packed only
   for a weight as wide as the LM head).
2. answers: the same questions through two engines in this process, one on the packed model and one on the plain
   model (the same weights), at the engine's defaults for the model or at the paper setting; greedy, batch 8. It
   reports how many answers are identical token for token, the largest difference of a training loss, and each
   engine's wall time.

    python bench/packing.py [--questions 76] [--setting defaults|paper] [--threads 2] [--out FILE]
    # a smoke run (tests/test_bench_packing.py):
    python bench/packing.py --questions 2 --max-tokens 4 --skip-products --decode-steps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import deque
from pathlib import Path

import torch
from torch import nn

from relat_core import Engine, Finished, Request, SamplingParams, TrainStep, load_model, packing
from relat_core.engine import Failed
from relat_core.packing import PackedForward

DATA = Path(__file__).resolve().parent / "data" / "knowledge_dev.jsonl"
PAPER = dict(method="relat", latent_steps=16, steps=5, rank=8, follow_up="bridge", adapter_during_answer=True,
             answer_context="thought", cache=False)
ROWS = (1, 8, 64, 512)


def best_of(run, repeats: int = 3, loops: int = 20) -> float:
    """Seconds per call: the best of `repeats` timings of `loops` calls, after a warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            run()
        times.append((time.perf_counter() - start) / loops)
    return min(times)


def products(model: nn.Module) -> list[dict]:
    """Per distinct (out, in) shape of the model's packed linear layers and row count: plain and packed seconds."""
    layers: dict[tuple[int, int], tuple[str, nn.Linear]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and isinstance(module.__dict__.get("forward"), PackedForward):
            layers.setdefault(tuple(module.weight.shape), (name.split(".")[-1], module))
    rows = []
    with torch.no_grad():
        for (out_features, in_features), (name, module) in layers.items():
            for count in ROWS:
                x = torch.randn(count, in_features)
                loops = max(2, min(50, int(2e9 / (count * out_features * in_features))))
                plain = best_of(lambda x=x, m=module: nn.functional.linear(x, m.weight, m.bias), loops=loops)
                # The packed product itself, which the layer's forward skips for a single row of a narrow weight.
                packed = best_of(lambda x=x, m=module: packing._packed_linear(x, m.forward.packed, m.bias),
                                 loops=loops)
                rows.append({"layer": name, "out": out_features, "in": in_features, "rows": count,
                             "plain_us": plain * 1e6, "packed_us": packed * 1e6, "speedup": plain / packed})
    return rows


def decode_steps(plain_model: nn.Module, packed_model: nn.Module, context: int = 100, steps: int = 12
                 ) -> list[dict]:
    """Milliseconds per one-token step of the whole model, at 1 and 8 rows: the mean of the fastest two thirds of
    `steps` steps, each over the same `context`-token cache (cropped back after it)."""
    shipped_threshold = packing._ONE_ROW_PACKED_FROM_OUT_FEATURES  # restored at the end, whatever happens
    variants = {"plain": (plain_model, None), "packed": (packed_model, 0), "shipped": (packed_model, shipped_threshold)}
    rows = []
    try:
        with torch.no_grad():
            for count in (1, 8):
                generator = torch.Generator().manual_seed(count)
                prompt = torch.randint(0, 1000, (count, context), generator=generator)
                token = torch.randint(0, 1000, (count, 1), generator=generator)
                for variant, (model, threshold) in variants.items():
                    if threshold is not None:
                        packing._ONE_ROW_PACKED_FROM_OUT_FEATURES = threshold
                    cache = model(input_ids=prompt, use_cache=True).past_key_values
                    times = []
                    for _ in range(steps):
                        start = time.perf_counter()
                        model(input_ids=token, past_key_values=cache, use_cache=True)
                        times.append(time.perf_counter() - start)
                        cache.crop(-1)
                    fastest = sorted(times)[:max(1, 2 * steps // 3)]
                    rows.append({"rows": count, "variant": variant, "ms": 1e3 * sum(fastest) / len(fastest)})
    finally:
        packing._ONE_ROW_PACKED_FROM_OUT_FEATURES = shipped_threshold
    return rows


def run_all(engine: Engine, requests: list[Request], batch: int) -> tuple[dict[int, dict], float]:
    """Every request through the engine, `batch` at a time; per request its tokens, text and losses."""
    todo, out = deque(enumerate(requests)), {i: {"losses": []} for i in range(len(requests))}
    start, in_flight = time.perf_counter(), 0
    while todo or in_flight:
        while todo and in_flight < batch:
            index, request = todo.popleft()
            engine.add_request(str(index), request)
            in_flight += 1
        for request_id, event in engine.step():
            record = out[int(request_id)]
            if isinstance(event, TrainStep):
                record["losses"].append(event.loss)
            elif isinstance(event, Finished):
                record.update(tokens=event.result.token_ids, text=event.result.text)
                in_flight -= 1
            elif isinstance(event, Failed):
                record["error"] = str(event.error)
                in_flight -= 1
    return out, time.perf_counter() - start


def answers(questions: list[str], setting: str, max_tokens: int, batch: int) -> dict:
    engines = {}
    for label, pack in (("packed", True), ("plain", False)):
        loaded = load_model(pack_weights=pack)
        engines[label] = Engine(loaded, max_rank=16, num_slots=batch)
    ttt = engines["plain"].defaults.replace(**PAPER) if setting == "paper" else engines["plain"].defaults
    requests = [Request([{"role": "user", "content": q}], ttt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
                for q in questions]
    results, seconds = {}, {}
    for label in ("plain", "packed", "plain-again"):  # the plain engine twice: its own run-to-run spread
        results[label], seconds[label] = run_all(engines[label.split("-")[0]], requests, batch)
        print(f"{label}: {len(requests)} answers in {seconds[label]:.1f} s", file=sys.stderr)
    same = [results["packed"][i].get("tokens") == results["plain"][i].get("tokens") for i in results["plain"]]
    loss_gap = max((abs(a - b) for i in results["plain"]
                    for a, b in zip(results["packed"][i]["losses"], results["plain"][i]["losses"], strict=True)),
                   default=0.0)
    differing = [{"question": questions[i], "plain": results["plain"][i].get("text"),
                  "packed": results["packed"][i].get("text")} for i, equal in enumerate(same) if not equal]
    return {"setting": setting, "ttt": {**dataclasses.asdict(ttt), "targets": list(ttt.targets)},
            "questions": len(questions), "identical_answers": sum(same), "largest_loss_difference": loss_gap,
            "seconds": seconds, "errors": sum("error" in r for run in results.values() for r in run.values()),
            "differing": differing}


def markdown(report: dict) -> str:
    lines = []
    if report.get("products"):
        lines += ["| layer | out × in | rows | MKL µs | packed µs | speed-up |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['out']} × {r['in']} | {r['rows']} | {r['plain_us']:,.0f} | "
                  f"{r['packed_us']:,.0f} | {r['speedup']:.2f}× |" for r in report["products"]]
        lines.append("")
    if report.get("decode_steps"):
        lines += ["| rows | variant | ms per step |", "|---|---|---|"]
        lines += [f"| {r['rows']} | {r['variant']} | {r['ms']:.1f} |" for r in report["decode_steps"]]
        lines.append("")
    a = report["answers"]
    lines.append(f"Answers ({a['setting']}, {a['questions']} questions, greedy, batch {report['batch']}): "
                 f"{a['identical_answers']}/{a['questions']} identical token for token; largest training-loss "
                 f"difference {a['largest_loss_difference']:.2e}; wall s plain {a['seconds']['plain']:.1f}, packed "
                 f"{a['seconds']['packed']:.1f}, plain again {a['seconds']['plain-again']:.1f}; errors {a['errors']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=76, help="the first K of knowledge_dev.jsonl")
    parser.add_argument("--setting", choices=("defaults", "paper"), default="defaults")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-products", action="store_true", help="skip the per-product table")
    parser.add_argument("--decode-steps", type=int, default=12, help="steps timed per variant (0: skip them)")
    parser.add_argument("--out", type=Path, help="write the report as JSON here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
                    "batch": args.batch}
    if not args.skip_products:
        report["products"] = products(load_model().model)
        print(f"products: {len(report['products'])} timed", file=sys.stderr)
    if args.decode_steps:
        report["decode_steps"] = decode_steps(load_model(pack_weights=False).model, load_model().model,
                                              steps=args.decode_steps)
        print("decode steps timed", file=sys.stderr)
    questions = [json.loads(line)["question"] for line in DATA.open()][:args.questions]
    report["answers"] = answers(questions, args.setting, args.max_tokens, args.batch)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
