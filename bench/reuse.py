"""Train once, answer many (issue 16): the adapter cache on repeated questions, and n answers from one training.

Both workloads run in this process on one engine (the embedded model unless --model), at the engine's defaults for
the model (relat; on SmolLM2-135M: L=4, N=2, lr 5e-3, rank 8, the answer from the question through the adapter),
--max-tokens answer tokens, --threads torch threads, after one warm-up request.

  - repetition: --requests requests drawn (seeded) from the first --distinct questions of
    bench/data/knowledge_dev.jsonl, greedy, --concurrency at a time in a closed loop; once with the cache off
    and once with it on (a fresh, empty cache). Reported: p50 and p95 latency (submit to the last token),
    requests/s, and the hit rate.
  - sampling: --questions questions, --n answers each at temperature 0.7: one request with n answers at a time,
    against the n separate requests of a question sent together (batched, so the comparison is not with a queue),
    with the cache off. Reported: seconds per answer, and the answers that differ (sampled apart).

    python bench/reuse.py                       # both, the embedded model (about half an hour on 2 cores)
    python bench/reuse.py --requests 10 --distinct 3 --questions 2 --max-tokens 8   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from relat_core import AdapterCache, Engine, Finished, Request, SamplingParams, load_model
from relat_core.engine import Failed

BENCH = Path(__file__).resolve().parent
DATA = BENCH / "data" / "knowledge_dev.jsonl"


def questions(count: int) -> list[str]:
    return [json.loads(line)["question"] for line in DATA.open()][:count]


def request(question: str, sampling: SamplingParams, engine: Engine) -> Request:
    return Request([{"role": "user", "content": question}], engine.defaults, sampling)


def closed_loop(engine: Engine, requests: list[Request], concurrency: int) -> tuple[list[float], float, list]:
    """Latency of each request (submit to Finished), the wall time, and the results, in request order."""
    pending = list(range(len(requests)))
    submitted: dict[str, float] = {}
    latency: list[float] = [0.0] * len(requests)
    results: list = [None] * len(requests)
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests:
        while pending and len(submitted) < concurrency:
            index = pending.pop(0)
            submitted[str(index)] = time.perf_counter()
            engine.add_request(str(index), requests[index])
        for request_id, event in engine.step():
            if isinstance(event, Finished | Failed):
                index = int(request_id)
                latency[index] = time.perf_counter() - submitted.pop(request_id)
                if isinstance(event, Failed):
                    raise RuntimeError(f"request {index} failed: {event.error!r}")
                results[index] = event.result
    return latency, time.perf_counter() - start, results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def repetition(engine: Engine, args: argparse.Namespace) -> dict:
    pool = questions(args.distinct)
    drawn = random.Random(args.seed).choices(pool, k=args.requests)
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    rows = {}
    for name, cache in (("cache off", AdapterCache(0, 0)), ("cache on", AdapterCache(args.entries, 256 << 20))):
        engine.adapter_cache = cache
        latency, wall, results = closed_loop(engine, [request(q, greedy, engine) for q in drawn], args.concurrency)
        rows[name] = {"p50_s": statistics.median(latency), "p95_s": percentile(latency, 0.95),
                      "requests_per_s": len(drawn) / wall, "wall_s": wall,
                      "hit_rate": cache.stats.hits / len(drawn) if cache.enabled else None,
                      "hits": cache.stats.hits, "misses": cache.stats.misses,
                      "answers": [r.text for r in results]}
    # A hit answers as the miss would: the same text, question by question.
    rows["same answers with the cache on"] = rows["cache on"]["answers"] == rows["cache off"]["answers"]
    return rows


def sampling_workload(engine: Engine, args: argparse.Namespace) -> dict:
    engine.adapter_cache = AdapterCache(0, 0)
    rows: dict[str, dict] = {}
    pool = questions(args.questions)
    n = args.n

    def sampled(seed: int, answers: int) -> SamplingParams:
        return SamplingParams(max_tokens=args.max_tokens, temperature=0.7, seed=seed, n=answers)

    wall = 0.0
    distinct = []
    for index, question in enumerate(pool):
        _, seconds, results = closed_loop(engine, [request(question, sampled(index * 100, n), engine)], 1)
        wall += seconds
        distinct.append(len({c.text for c in results[0].choices}))
    rows[f"one request, n={n}"] = {"seconds_per_answer": wall / (len(pool) * n), "wall_s": wall,
                                   "distinct_answers_mean": statistics.mean(distinct)}
    wall = 0.0
    distinct = []
    for index, question in enumerate(pool):
        separate = [request(question, sampled(index * 100 + k, 1), engine) for k in range(n)]
        _, seconds, results = closed_loop(engine, separate, n)
        wall += seconds
        distinct.append(len({r.text for r in results}))
    rows[f"{n} separate requests, together"] = {"seconds_per_answer": wall / (len(pool) * n), "wall_s": wall,
                                                "distinct_answers_mean": statistics.mean(distinct)}
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--distinct", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--entries", type=int, default=64, help="the cache's entries (the server's default)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workload", choices=("both", "repetition", "sampling"), default="both")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, "cpu")
    engine = Engine(loaded, max_rank=16, num_slots=max(args.concurrency, 1))
    closed_loop(engine, [request("What is the capital of France?", SamplingParams(max_tokens=4), engine)], 1)
    report = {"date": datetime.date.today().isoformat(), "model": engine.name, "defaults": str(engine.defaults),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.platform()}",
              "args": {k: str(v) for k, v in vars(args).items()}}
    if args.workload in ("both", "repetition"):
        report["repetition"] = repetition(engine, args)
        for name in ("cache off", "cache on"):
            row = report["repetition"][name]
            print(f"repetition, {name}: p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s, "
                  f"{row['requests_per_s']:.3f} requests/s, hit rate {row['hit_rate']}", flush=True)
        print(f"same answers with the cache on: {report['repetition']['same answers with the cache on']}")
    if args.workload in ("both", "sampling"):
        report["sampling"] = sampling_workload(engine, args)
        for name, row in report["sampling"].items():
            print(f"sampling, {name}: {row['seconds_per_answer']:.2f} s per answer, "
                  f"{row['distinct_answers_mean']:.2f} distinct answers of {args.n}", flush=True)
    out = args.out or BENCH / "results" / f"reuse-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"report: {out}")


if __name__ == "__main__":
    main()
