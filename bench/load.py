"""Load generator of issue 4: K ReLAT requests at concurrency C, straight to the engine and through HTTP.

What it measures and why: a server with several users must train their adapters and decode their answers
together; issue 4's targets are throughput at concurrency 8 of at least 5x a naive transformers + peft loop
(bench/naive.py), and a single request's p50 latency at most a third of that loop's. For each target and C it
reports requests/s, p50/p95 latency, p50 time to first token, tokens/s and peak memory; with --naive, the naive
loop runs in the same process and the same run, one request after another.

How: every request is the paper setting (relat, L=16 latent steps, N=5 steps, rank 8, bridge follow-up, adapter on
while answering), greedy, at most 64 answer tokens; questions are the first K of bench/data/knowledge_dev.jsonl
(repeated past its end). The load is a closed loop: C requests in flight, the next sent when one finishes.
  - engine: in-process, `Engine(loaded, max_rank=16, num_slots=C)`; requests go in with `add_request` and advance
    with `step()`; submit, first TextDelta (time to first token), Finished and completion tokens are recorded.
    Each C gets a freshly loaded model and engine (the engine hooks its adapter slots into the model).
  - http: C concurrent streaming clients (httpx) on POST /v1/chat/completions, the TTT fields in the `relat`
    object; the time to first token is the first non-empty content delta, the tokens come from the usage chunk.
    --serve starts `relat serve --max-concurrency C --max-queue 64` for each C and stops it afterwards.
  - naive: bench/naive.py's `naive_request`, one after another, on its own freshly loaded model.
--weights int8|int4 stores the engine's (or the served model's) frozen linear layers low-bit (relat serve
--weights); --setting defaults sends relat at the served model's own defaults instead of the paper setting. The
naive loop is the baseline either way: fp32, the paper setting.
Each run starts with --warmup requests alone (not counted: first-call costs). Every request trains (the adapter
cache is off) and decodes exactly 64 tokens: the naive loop ignores EOS, and the engine gets `ignore_eos` (over
HTTP, vLLM's top-level field), so the work per request is the same everywhere.
Memory is the peak resident set (VmHWM, as bench/phases.py reads it), reset (writing 5 to clear_refs) when a run's
timed part starts: of this process for engine and naive runs, of the server's process for HTTP (needs --serve or
--server-pid). The "+" is the excess over the resident set at that moment; the allocator keeps what earlier runs
freed, so within one process runs go in increasing C and naive first. Raw per-request records are appended to
bench/results/load-<date>.jsonl (--results elsewhere: smoke runs). The floor (bench/floor.py) for the same token
counts closes the report, and the "of floor" column is the measured requests/s over the floor's at that C.

    python bench/load.py --target engine --concurrency 1 4 8 16 --naive --naive-requests 2 --threads 1
    python bench/load.py --target http --serve --port 8765 --concurrency 1 4 8 16 --threads 1
    python bench/load.py --target http --serve --concurrency 8 --weights int8 --setting defaults --naive
    python bench/load.py --target engine --concurrency 1 --requests 1 --latent-steps 2 --steps 1 --max-tokens 4
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import torch
from phases import reset_peak, status_mib  # bench/phases.py, beside this file

from relat_core.params import SamplingParams

BENCH = Path(__file__).resolve().parent
DATA = BENCH / "data" / "knowledge_dev.jsonl"
RESULTS = BENCH / "results"
# The paper's setting, every choice spelled out so that a change of the engine's defaults does not change it.
METHOD = {"method": "relat", "latent_steps": 16, "steps": 5, "rank": 8, "follow_up": "bridge",
          "adapter_during_answer": True, "answer_context": "thought"}


@dataclass
class Record:
    """One request, times in seconds from the start of its run's timed part."""

    target: str
    concurrency: int
    index: int
    question: str
    submit: float
    first_token: float | None = None
    finish: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    losses: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # the engine's own trace, where there is one
    error: str | None = None

    @property
    def latency(self) -> float | None:
        return None if self.finish is None else self.finish - self.submit

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submit


@dataclass
class Run:
    target: str
    concurrency: int
    records: list[Record]
    wall: float  # first submit to last finish
    rss_start: float | None  # MiB, when the timed part started (the peak was reset then)
    peak: float | None  # MiB
    resettable: bool


def start_memory(pid: int | str | None) -> tuple[float | None, bool]:
    if pid is None:
        return None, False
    resettable = reset_peak(pid)
    return status_mib("VmRSS", pid), resettable


# -- questions and requests -------------------------------------------------------------------------------------

def questions(count: int) -> list[str]:
    pool = [json.loads(line)["question"] for line in DATA.open()]
    return [pool[i % len(pool)] for i in range(count)]


def method_params(args: argparse.Namespace) -> dict:
    """The paper setting, with the smoke-run overrides and the speed levers asked for (engine and http only: the
    naive loop is the baseline, and backpropagates through the whole thought)."""
    levers = {"backprop_latent_steps": args.backprop_latent_steps} if args.backprop_latent_steps else {}
    # No adapter cache: every request trains, as the naive loop's does. With it, the server answered the first
    # timed question, which the warm-up had asked, from the cache (bench/RESULTS.md, section 15); reuse has its own
    # benchmark, bench/reuse.py.
    if args.setting == "defaults":  # relat at the served model's defaults: only the method and the cache are named
        return {"method": "relat", "cache": False, **levers}
    return {**METHOD, "latent_steps": args.latent_steps, "steps": args.steps, "cache": False, **levers}


# -- engine target ----------------------------------------------------------------------------------------------

def engine_request(question: str, args: argparse.Namespace):
    from relat_core import Request, TTTParams

    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    return Request([{"role": "user", "content": question}], TTTParams(**method_params(args)), sampling)


def closed_loop(engine, concurrency: int, requests: list, records: list[Record], clock: float) -> None:
    """Keep `concurrency` requests in the engine; add the next as soon as one finishes."""
    from relat_core import EngineBusy, Finished, TextDelta, TrainStep
    from relat_core.engine import Failed

    pending = list(range(len(requests)))
    in_flight: set[str] = set()
    while pending or engine.has_unfinished_requests:
        while pending and len(in_flight) < concurrency:
            index = pending[0]
            records[index].submit = time.perf_counter() - clock
            try:
                engine.add_request(str(index), requests[index])
            except EngineBusy:  # a finished request's slot not released yet: try again after the next step
                break
            pending.pop(0)
            in_flight.add(str(index))
        for request_id, event in engine.step():
            record, now = records[int(request_id)], time.perf_counter() - clock
            if isinstance(event, TrainStep):
                record.losses.append(event.loss)
            elif isinstance(event, TextDelta):
                if record.first_token is None and event.text:
                    record.first_token = now
            elif isinstance(event, Finished):
                result = event.result
                record.finish, record.finish_reason = now, result.finish_reason
                record.completion_tokens = result.usage.completion_tokens
                record.timings = dict(result.trace.timings)
                if record.first_token is None and result.token_ids:  # text held back by the detokenizer
                    record.first_token = now
                in_flight.discard(request_id)
            elif isinstance(event, Failed):  # this request failed alone; the others go on
                record.error = f"{type(event.error).__name__}: {event.error}"
                in_flight.discard(request_id)


def run_engine(concurrency: int, count: int, args: argparse.Namespace) -> Run:
    from relat_core import Engine, load_model

    loaded = load_model(weights=args.weights)
    touch_weights(loaded.model)
    engine = Engine(loaded, max_rank=16, num_slots=concurrency)  # the server's defaults
    texts = questions(count)
    if args.warmup:
        closed_loop(engine, 1, [engine_request(q, args) for q in texts[:args.warmup]],
                    [Record("engine", concurrency, i, q, 0.0) for i, q in enumerate(texts[:args.warmup])],
                    time.perf_counter())
    records = [Record("engine", concurrency, i, q, 0.0) for i, q in enumerate(texts)]
    requests = [engine_request(q, args) for q in texts]
    rss, resettable = start_memory("self")
    clock = time.perf_counter()
    closed_loop(engine, concurrency, requests, records, clock)
    wall = max((r.finish for r in records if r.finish is not None), default=0.0)
    peak = status_mib("VmHWM")
    del engine, loaded
    gc.collect()
    return Run("engine", concurrency, records, wall, rss, peak, resettable)


def touch_weights(model: torch.nn.Module) -> None:
    """Page every weight in before measuring (bench/phases.py: safetensors are memory-mapped)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.sum()


# -- naive baseline ---------------------------------------------------------------------------------------------

def run_naive(count: int, args: argparse.Namespace) -> Run:
    from naive import naive_request  # bench/naive.py, beside this file

    from relat_core import load_model

    loaded = load_model(pack_weights=False)  # the plain transformers model: torch's linear, as users run it
    touch_weights(loaded.model)
    texts = questions(count)
    options = {"latent_steps": args.latent_steps, "steps": args.steps, "max_tokens": args.max_tokens}
    for question in texts[:args.warmup]:
        naive_request(loaded, question, **options)
    records = [Record("naive", 1, i, q, 0.0) for i, q in enumerate(texts)]
    rss, resettable = start_memory("self")
    clock = time.perf_counter()
    for record in records:
        record.submit = time.perf_counter() - clock
        result = naive_request(loaded, record.question, **options)
        record.finish = time.perf_counter() - clock
        record.first_token = record.submit + result["first_token_s"]
        record.completion_tokens, record.finish_reason = len(result["tokens"]), "length"
        record.losses = result["losses"]
        record.timings = {"train_s": result["train_s"], "first_token_s": result["first_token_s"],
                          "total_s": result["seconds"]}
    peak = status_mib("VmHWM")
    del loaded
    gc.collect()
    return Run("naive", 1, records, records[-1].finish, rss, peak, resettable)


# -- HTTP target ------------------------------------------------------------------------------------------------

def http_body(question: str, args: argparse.Namespace) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "stream": True,
            "stream_options": {"include_usage": True}, "max_completion_tokens": args.max_tokens, "temperature": 0,
            "relat": method_params(args), "ignore_eos": True}  # vLLM's extension: every answer is max_tokens long
    return body


async def stream_one(client: httpx.AsyncClient, url: str, record: Record, body: dict, clock: float) -> None:
    record.submit = time.perf_counter() - clock
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = json.dumps(chunk["error"])[:200]
                for choice in chunk.get("choices") or []:
                    if choice.get("delta", {}).get("content") and record.first_token is None:
                        record.first_token = time.perf_counter() - clock
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
                if chunk.get("usage"):
                    record.completion_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("relat"):
                    record.losses = [step["loss"] for step in chunk["relat"].get("steps", [])]
                    record.timings = chunk["relat"].get("timings", {})
    except httpx.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}"
        return
    record.finish = time.perf_counter() - clock


async def http_loop(url: str, concurrency: int, records: list[Record], args: argparse.Namespace,
                    headers: dict[str, str]) -> float:
    """C workers, each sending the next request when its last one finishes; returns the clock's start."""
    queue = list(records)
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=30.0), limits=limits,
                                 headers=headers) as client:
        clock = time.perf_counter()

        async def worker() -> None:
            while queue:
                record = queue.pop(0)
                await stream_one(client, url, record, http_body(record.question, args), clock)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return clock


def start_server(concurrency: int, args: argparse.Namespace) -> subprocess.Popen:
    """`relat serve` on --port with this concurrency; returns once GET /ready answers 200."""
    relat = Path(sys.executable).with_name("relat")
    command = [str(relat), "serve", "--max-concurrency", str(concurrency), "--max-queue", "64", "--port",
               str(args.port), "--torch-threads", str(args.threads), "--log-level", "warning", "--weights",
               args.weights]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"relat serve exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError("relat serve was not ready within 300 s")


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def run_http(concurrency: int, count: int, args: argparse.Namespace) -> Run:
    server = start_server(concurrency, args) if args.serve else None
    pid = server.pid if server is not None else args.server_pid
    url = f"http://127.0.0.1:{args.port}" if server is not None else args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        texts = questions(count)
        if args.warmup:
            asyncio.run(http_loop(url, 1, [Record("http", concurrency, i, q, 0.0)
                                           for i, q in enumerate(texts[:args.warmup])], args, headers))
        records = [Record("http", concurrency, i, q, 0.0) for i, q in enumerate(texts)]
        rss, resettable = start_memory(pid)
        asyncio.run(http_loop(url, concurrency, records, args, headers))
        peak = status_mib("VmHWM", pid) if pid is not None else None
    finally:
        if server is not None:
            stop_server(server)
    finished = [r.finish for r in records if r.finish is not None]
    return Run("http", concurrency, records, max(finished) if finished else 0.0, rss, peak, resettable)


# -- report -----------------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    values = sorted(values)
    position = (len(values) - 1) * q
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def summary(run: Run) -> dict:
    ok = [r for r in run.records if r.error is None and r.finish is not None]
    start = min((r.submit for r in run.records), default=0.0)
    wall = run.wall - start
    tokens = sum(r.completion_tokens for r in ok)
    return {"target": run.target, "concurrency": run.concurrency, "requests": len(run.records), "ok": len(ok),
            "requests_per_s": len(ok) / wall if wall > 0 else None,
            "p50_s": percentile([r.latency for r in ok], 0.5), "p95_s": percentile([r.latency for r in ok], 0.95),
            "p50_ttft_s": percentile([r.ttft for r in ok if r.ttft is not None], 0.5),
            "tokens_per_s": tokens / wall if wall > 0 else None,
            "mean_tokens": statistics.mean(r.completion_tokens for r in ok) if ok else None,
            "rss_start_mib": run.rss_start, "peak_mib": run.peak, "resettable": run.resettable, "wall_s": wall}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict], floor_rps: dict[int, float] | None) -> str:
    lines = ["| target | C | requests (ok) | requests/s | p50 latency s | p95 latency s | p50 TTFT s | tokens/s | "
             "mean tokens | peak MiB (+ over start) | of floor |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        peak = "–" if row["peak_mib"] is None else f"{row['peak_mib']:,.0f}" + (
            "" if row["rss_start_mib"] is None else f" (+{max(row['peak_mib'] - row['rss_start_mib'], 0):,.0f})")
        floor = floor_rps.get(row["concurrency"]) if floor_rps else None
        share = "–" if floor is None or not row["requests_per_s"] else f"{row['requests_per_s'] / floor:.0%}"
        lines.append(f"| {row['target']} | {row['concurrency']} | {row['requests']} ({row['ok']}) | "
                     f"{_fmt(row['requests_per_s'], 3)} | {_fmt(row['p50_s'])} | {_fmt(row['p95_s'])} | "
                     f"{_fmt(row['p50_ttft_s'])} | {_fmt(row['tokens_per_s'])} | {_fmt(row['mean_tokens'], 1)} | "
                     f"{peak} | {share} |")
    return "\n".join(lines) + "\n"


def comparison(rows: list[dict]) -> list[str]:
    """Issue 4's two targets, where the runs allow them."""
    naive = next((r for r in rows if r["target"] == "naive"), None)
    if naive is None or not naive["requests_per_s"]:
        return []
    lines = []
    for row in rows:
        if row["target"] == "naive" or not row["requests_per_s"]:
            continue
        if row["concurrency"] == 8:
            ratio = row["requests_per_s"] / naive["requests_per_s"]
            lines.append(f"- {row['target']} C=8 throughput / naive: {ratio:.1f}x (target >= 5x)")
        if row["concurrency"] == 1 and row["p50_s"]:
            lines.append(f"- {row['target']} C=1 p50 latency / naive: {row['p50_s'] / naive['p50_s']:.2f}"
                         " (target <= 0.33)")
    return lines


def floor_section(args: argparse.Namespace, concurrency: list[int]) -> tuple[str, dict[int, float]]:
    """bench/floor.py for the token counts of the questions sent, at this run's thread count."""
    import floor  # bench/floor.py, beside this file

    from relat_core import load_model

    loaded = load_model()
    count = max(args.naive_requests, max(requests_for(c, args) for c in concurrency))
    tokens = floor.tokens_of(loaded.tokenizer, questions(count), args.latent_steps, args.steps, args.max_tokens)
    machine = floor.measure(loaded.model, [args.threads])
    flops = floor.request_flops(loaded.model.config, tokens)
    reads = floor.request_bytes(loaded.model.config, tokens, weights=args.weights)
    rps = {c: floor.floors(flops["total"], reads["total"], machine[args.threads], c)["requests_per_s"]
           for c in sorted(set(concurrency) | {1})}
    return floor.report(loaded.model.config, tokens, machine, sorted(rps), args.weights), rps


def requests_for(concurrency: int, args: argparse.Namespace) -> int:
    return args.requests if args.requests else max(2 * concurrency, 2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("engine", "http"), default="engine")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=None, help="K per concurrency (default 2*C, at least 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (also the served engine's)")
    parser.add_argument("--naive", action="store_true", help="also run bench/naive.py's loop in this process")
    parser.add_argument("--naive-requests", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="requests alone before each timed run (not counted)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server, for --target http")
    parser.add_argument("--serve", action="store_true", help="start `relat serve` per concurrency on --port")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--server-pid", type=int, default=None, help="for the memory of a server not started here")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--no-floor", action="store_true", help="skip bench/floor.py's analysis")
    parser.add_argument("--results", type=Path, default=None,
                        help="where to append the raw records (default bench/results/load-<date>.jsonl)")
    parser.add_argument("--weights", choices=("fp32", "int8", "int4"), default="fp32",
                        help="the engine's frozen linear layers (relat serve --weights); the naive loop stays fp32")
    parser.add_argument("--setting", choices=("paper", "defaults"), default="paper",
                        help="relat at the paper setting (L=16, N=5, bridge, adapter while answering) or at the "
                             "served model's defaults (the naive loop runs the paper setting either way)")
    parser.add_argument("--backprop-latent-steps", type=int, default=0,
                        help="a lever (issue 15): relat trains through the thought's last K latent steps only "
                             "(0: all); a run that sets it names it in its setting line")
    smoke = parser.add_argument_group("smoke runs only (the benchmark is L=16, N=5, 64 tokens)")
    smoke.add_argument("--latent-steps", type=int, default=METHOD["latent_steps"])
    smoke.add_argument("--steps", type=int, default=METHOD["steps"])
    smoke.add_argument("--max-tokens", type=int, default=64)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from phases import machine_info  # bench/phases.py, beside this file

    info = machine_info(args.threads)
    concurrency = sorted(args.concurrency)
    runs: list[Run] = []
    if args.naive:
        print(f"naive: {args.naive_requests} requests ...", file=sys.stderr, flush=True)
        runs.append(run_naive(args.naive_requests, args))
    for c in concurrency:
        print(f"{args.target} C={c}: {requests_for(c, args)} requests ...", file=sys.stderr, flush=True)
        runs.append((run_engine if args.target == "engine" else run_http)(c, requests_for(c, args), args))
    rows = [summary(run) for run in runs]
    floor_text, floor_rps = ("", None) if args.no_floor else floor_section(args, concurrency)

    date = datetime.datetime.now(datetime.timezone.utc)
    path = args.results or RESULTS / f"load-{date:%Y-%m-%d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    setting = {"max_tokens": args.max_tokens, "greedy": True, "ignore_eos": True, "threads": args.threads,
               "date": info["date"]}
    naive_setting = {**METHOD, "latent_steps": args.latent_steps, "steps": args.steps, "cache": False,
                     "weights": "fp32", "setting": "paper"}  # bench/naive.py's loop, whatever the engine ran
    engine_setting = {**method_params(args), "weights": args.weights, "setting": args.setting}
    with path.open("a", encoding="utf-8") as out:
        for run in runs:
            for record in run.records:
                own = naive_setting if record.target == "naive" else engine_setting
                out.write(json.dumps({**asdict(record), "latency": record.latency, "ttft": record.ttft,
                                      **own, **setting}) + "\n")

    print(" · ".join(f"{key}: {value}" for key, value in info.items()) + "\n")
    described = (f"L={args.latent_steps}, N={args.steps}, rank 8, bridge, adapter on while answering"
                 if args.setting == "paper" else "the served model's defaults")
    print(f"relat, {described}, weights {args.weights}, greedy, at most "
          f"{args.max_tokens} tokens (EOS ignored); closed loop, {args.warmup} warm-up request(s) per run; "
          f"target {args.target}"
          f"{' (relat serve started per C)' if args.serve else ''}.\n")
    print(markdown(rows, floor_rps))
    if not all(row["resettable"] for row in rows if row["peak_mib"] is not None):
        print("Some peaks could not be reset: they are the whole process's, model load included.\n")
    for line in comparison(rows):
        print(line)
    if floor_text:
        print("\n" + floor_text)
    print(f"raw records appended to {path}")


if __name__ == "__main__":
    main()
