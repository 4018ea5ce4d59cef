"""Fairness benchmark of issue 28: what one tenant's flood does to another tenant's latency, through HTTP.

`relat serve` runs with a keys file of two tenants, `a` and `b`, neither with limits of its own (the server decides
their shares: server/fair_queue.py). Tenant B sends one request at a time (closed loop, one client); each round
measures B's requests in three conditions, back to back, their order rotated from round to round:
  - alone: nothing else on the server;
  - flood: tenant A's --flood-clients clients send without pause, ignoring Retry-After (a 429 is retried after
    --flood-pause seconds), far more than A's share (max_concurrency / 2 while B is busy too);
  - flood, same key: the same flood, with B sending on A's key: one tenant, one queue, first come first served,
    which is how every request was admitted before tenants had queues of their own. The control.
  - flood, reserve R (with --compare-reserve R): the flood, on a second server that differs only in its
    --tenant-reserve (0: no places kept for an idle tenant, as before the reserve), running beside the first and
    idle while the others run, so that the reserve's effect is paired within each round.
B retries a 429 after its Retry-After (as the openai SDK does); its latency counts from the first try.
Between conditions the flood's clients leave (their requests are cancelled) and the server is let go idle.

Every request is the same: direct (no training), --max-tokens tokens with ignore_eos, so that B's and A's requests
cost the same and a latency difference is queueing, not work. Reported: B's p50 and p95 latency per condition over
all rounds, their ratios against alone with a bootstrap interval over rounds, A's answered and refused requests
and the answers a second of both tenants during each flood (the reserve's cost in throughput), and whether the
stated bound held: B's p95 under flood at most --bound times its p95 alone.

    python bench/fairness.py                        # the embedded model, 6 rounds (minutes)
    python bench/fairness.py --tenant-reserve 1 --compare-reserve 0   # the reserve against none, paired
    python bench/fairness.py --model /path/to/tiny --rounds 1 --per-condition 3 --flood-clients 6
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import os
import platform
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
CONDITIONS = ("alone", "flood", "flood_same_key")
QUESTION = "Name three primary colours."


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# -- the server -------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_keys_file(folder: Path, keys: dict[str, str]) -> Path:
    """A keys file of these tenants (name: plain key), holding only each key's digest."""
    path = folder / "keys.json"
    tenants = [{"name": name, "key_sha256": hashlib.sha256(key.encode()).hexdigest()} for name, key in keys.items()]
    path.write_text(json.dumps({"tenants": tenants}))
    return path


def start_server(args: argparse.Namespace, keys_file: Path, log: Path, reserve: int | None
                 ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    relat = Path(sys.executable).with_name("relat")
    command = [str(relat), "serve", "--host", "127.0.0.1", "--port", str(port),
               "--max-concurrency", str(args.max_concurrency), "--max-queue", str(args.max_queue),
               "--torch-threads", str(args.threads), "--log-level", "warning"]
    if args.model:
        command += ["--model", args.model]
    if reserve is not None:
        command += ["--tenant-reserve", str(reserve)]
    env = {**os.environ, "RELAT_KEYS_FILE": str(keys_file), "OMP_NUM_THREADS": str(args.threads)}
    with open(log, "wb") as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"relat serve exited with {server.returncode}; its log: {log}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"relat serve was not ready within {args.start_timeout:.0f} s; its log: {log}")


def stop_server(server: subprocess.Popen) -> int:
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


# -- the clients ------------------------------------------------------------------------------------------------

def body(model: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_completion_tokens": max_tokens,
            "ignore_eos": True, "relat": {"method": "direct"}}


async def steady(client: httpx.AsyncClient, key: str, payload: dict, count: int) -> tuple[list[float], int]:
    """B: `count` requests one after the other; each one's latency (seconds, from its first try: a 429 is retried
    after its Retry-After, as the openai SDK does) and the number of 429s B got."""
    latencies, refused = [], 0
    for _ in range(count):
        started = time.monotonic()
        while True:
            response = await client.post("/v1/chat/completions", json=payload,
                                         headers={"Authorization": f"Bearer {key}"})
            if response.status_code != 429:
                break
            refused += 1
            await asyncio.sleep(float(response.headers.get("retry-after", 1)))
        if response.status_code != 200:
            raise RuntimeError(f"the steady tenant got {response.status_code}: {response.text[:300]}")
        latencies.append(time.monotonic() - started)
    return latencies, refused


async def flood(client: httpx.AsyncClient, key: str, payload: dict, pause: float, counts: dict[str, int]) -> None:
    """One of A's clients: send, and send again at once (after `pause` when refused), until cancelled."""
    headers = {"Authorization": f"Bearer {key}"}
    while True:
        try:
            response = await client.post("/v1/chat/completions", json=payload, headers=headers)
        except httpx.HTTPError:
            counts["errors"] += 1
            await asyncio.sleep(pause)
            continue
        counts[str(response.status_code)] = counts.get(str(response.status_code), 0) + 1
        if response.status_code != 200:
            await asyncio.sleep(pause)


async def wait_idle(client: httpx.AsyncClient, key: str, limit: float = 120.0) -> None:
    """Until nothing runs or waits (the flood's requests end at the engine's next step once their clients left)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status = (await client.get("/admin/status", headers={"Authorization": f"Bearer {key}"})).json()
        if not (status["requests_running"] or status["requests_waiting"]):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("the server did not go idle")


def conditions(args: argparse.Namespace) -> tuple[str, ...]:
    compared = () if args.compare_reserve is None else (f"flood_reserve_{args.compare_reserve}",)
    return CONDITIONS + compared


async def condition(url: str, name: str, keys: dict[str, str], payload: dict, args: argparse.Namespace
                    ) -> tuple[list[float], int, dict[str, int]]:
    """B's latencies in one condition, its 429s, and the flood's answers by status (and its seconds)."""
    counts: dict[str, int] = {"errors": 0}
    started = time.monotonic()
    limits = httpx.Limits(max_connections=args.flood_clients + 4, max_keepalive_connections=args.flood_clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.client_timeout, limits=limits) as client:
        flooders = []
        if name != "alone":
            flooders = [asyncio.create_task(flood(client, keys["a"], payload, args.flood_pause, counts))
                        for _ in range(args.flood_clients)]
            await asyncio.sleep(args.flood_lead)  # the flood fills the batch and the queue before B arrives
        try:
            b_key = keys["a"] if name == "flood_same_key" else keys["b"]
            latencies, refused = await steady(client, b_key, payload, args.per_condition)
        finally:
            for task in flooders:
                task.cancel()
            await asyncio.gather(*flooders, return_exceptions=True)
            counts["seconds"] = round(time.monotonic() - started, 3)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await wait_idle(client, keys["b"])
    return latencies, refused, counts


# -- the report -------------------------------------------------------------------------------------------------

def bootstrap_ratio(rounds: list[dict], condition_name: str, q: float, seed: int, samples: int = 2000
                    ) -> tuple[float | None, float | None]:
    """A 95% interval of percentile_q(condition) / percentile_q(alone), resampling rounds (a round's conditions
    ran back to back, so they are resampled together)."""
    rng = random.Random(seed)
    ratios = []
    for _ in range(samples):
        chosen = [rng.choice(rounds) for _ in rounds]
        under = percentile([x for r in chosen for x in r["b_latency"][condition_name]], q)
        alone = percentile([x for r in chosen for x in r["b_latency"]["alone"]], q)
        ratios.append(under / alone)
    return percentile(ratios, 0.025), percentile(ratios, 0.975)


def summarise(rounds: list[dict], args: argparse.Namespace) -> dict:
    rows = {}
    names = conditions(args)
    for name in names:
        values = [x for r in rounds for x in r["b_latency"][name]]
        rows[name] = {"n": len(values), "p50_s": percentile(values, 0.5), "p95_s": percentile(values, 0.95),
                      "max_s": max(values), "refused": sum(r["b_refused"][name] for r in rounds)}
    alone = rows["alone"]
    for name in names[1:]:
        for q, label in ((0.5, "p50"), (0.95, "p95")):
            rows[name][f"{label}_ratio"] = rows[name][f"{label}_s"] / alone[f"{label}_s"]
            rows[name][f"{label}_ratio_95ci"] = bootstrap_ratio(rounds, name, q, args.seed) if len(rounds) > 1 \
                else (None, None)
    flood_counts: dict[str, dict[str, int]] = {}
    for name in names[1:]:
        total: dict[str, int] = {}
        for r in rounds:
            for status, count in r["flood"][name].items():
                total[status] = total.get(status, 0) + count
        flood_counts[name] = total
        # Both tenants' answers a second while the flood ran: what the batch served (the reserve's cost).
        answered = total.get("200", 0) + rows[name]["n"]
        rows[name]["answers_per_s"] = answered / total["seconds"] if total.get("seconds") else None
    return {"b": rows, "flood_answers": flood_counts,
            "bound": {"claim": f"B never refused, and B's p95 under A's flood <= {args.bound} x B's p95 alone",
                      "held": rows["flood"]["refused"] == 0 and rows["flood"]["p95_s"] <= args.bound * alone["p95_s"]}}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _reserve(value: int | None) -> str:
    return "the server's default" if value is None else str(value)


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"B's latency (s) over {report['rounds']} rounds x {report['per_condition']} requests per condition; "
             f"A: {report['flood_clients']} clients; max_concurrency {report['server']['max_concurrency']}, "
             f"max_queue {report['server']['max_queue']}, tenant_reserve "
             f"{_reserve(report['server'].get('tenant_reserve'))}; {report['model']}, {report['date']}", "",
             "| condition | n | B 429s | B p50 | B p95 | B max | p50 / alone | p95 / alone (95% CI over rounds) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name in s["b"]:
        row = s["b"][name]
        low, high = row.get("p95_ratio_95ci", (None, None))
        ci = "" if low is None else f" ({_fmt(low)}–{_fmt(high)})"
        lines.append(f"| {name} | {row['n']} | {row['refused']} | {_fmt(row['p50_s'])} | {_fmt(row['p95_s'])} | "
                     f"{_fmt(row['max_s'])} | "
                     f"{_fmt(row.get('p50_ratio'))} | {_fmt(row.get('p95_ratio'))}{ci} |")
    lines += ["", "A's answers during the flood: " + "; ".join(
        f"{name}: " + ", ".join(f"{status} x{count}" for status, count in sorted(counts.items())
                                if count and status != "seconds")
        + f" in {counts.get('seconds', 0):.0f} s ({_fmt(s['b'][name].get('answers_per_s'))} answers/s, A's and B's)"
        for name, counts in s["flood_answers"].items()),
        "", f"Bound: {s['bound']['claim']}: {'held' if s['bound']['held'] else 'NOT held'}."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the model relat serve loads (default: the embedded one)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-condition", type=int, default=8, help="B's requests per condition per round")
    parser.add_argument("--flood-clients", type=int, default=20,
                        help="A's clients at once (default 20: 10x A's share of 4 places shared by 2 tenants)")
    parser.add_argument("--flood-pause", type=float, default=0.5,
                        help="seconds A waits after a refusal (its Retry-After ignored)")
    parser.add_argument("--flood-lead", type=float, default=2.0, help="seconds the flood runs before B starts")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--tenant-reserve", type=int, default=None,
                        help="the server's --tenant-reserve (default: the server's default)")
    parser.add_argument("--compare-reserve", type=int, default=None,
                        help="also run the flood on a second server with this --tenant-reserve (0: none), paired")
    parser.add_argument("--bound", type=float, default=3.0, help="the claim: B's p95 under flood / alone at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client-timeout", type=float, default=300.0)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=None, help="the JSON report (default bench/results/fairness/)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="relat-fairness-"))
    keys = {"a": "sk-a-" + secrets.token_hex(8), "b": "sk-b-" + secrets.token_hex(8)}
    keys_file = write_keys_file(scratch, keys)
    server, url = start_server(args, keys_file, scratch / "relat.log", args.tenant_reserve)
    servers = [server]
    names = conditions(args)
    urls = {name: url for name in names}
    rounds = []
    try:
        if args.compare_reserve is not None:
            compared, urls[names[-1]] = start_server(args, keys_file, scratch / "relat-compared.log",
                                                     args.compare_reserve)
            servers.append(compared)
        model = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {keys['b']}"},
                          timeout=30).json()["data"][0]["id"]
        payload = body(model, args.max_tokens)
        for warm in dict.fromkeys(urls.values()):  # warm-up, not counted
            asyncio.run(condition(warm, "alone", keys, payload, args))
        started = time.monotonic()
        for index in range(args.rounds):
            turn = index % len(names)
            order = names[turn:] + names[:turn]  # each condition first, middle and last in turn
            record = {"order": list(order), "b_latency": {}, "b_refused": {}, "flood": {}}
            for name in order:
                latencies, refused, counts = asyncio.run(condition(urls[name], name, keys, payload, args))
                record["b_latency"][name], record["b_refused"][name] = latencies, refused
                if name != "alone":
                    record["flood"][name] = counts
                print(f"round {index + 1} {name}: B p50 {percentile(latencies, 0.5):.2f} s, 429s {refused}, "
                      f"max {max(latencies):.2f} s; A {counts}", file=sys.stderr, flush=True)
            rounds.append(record)
        seconds = time.monotonic() - started
    finally:
        exit_codes = [stop_server(each) for each in servers]
    report = {
        "date": datetime.date.today().isoformat(), "model": model, "rounds": args.rounds,
        "per_condition": args.per_condition, "flood_clients": args.flood_clients, "flood_pause": args.flood_pause,
        "max_tokens": args.max_tokens, "seconds": seconds, "seed": args.seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "server": {"max_concurrency": args.max_concurrency, "max_queue": args.max_queue, "threads": args.threads,
                   "tenant_reserve": args.tenant_reserve, "compare_reserve": args.compare_reserve,
                   "exit_code": exit_codes},
        "summary": summarise(rounds, args), "rounds_detail": rounds,
    }
    out = args.out or BENCH / "results" / "fairness" / f"fairness-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    print(f"\nreport: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
