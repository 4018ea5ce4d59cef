"""Soak benchmark of issue 12: many requests through HTTP, more at once than the server admits, of every kind a
real server meets, and afterwards nothing lost, nothing leaked and nothing changed.

What it sends: --requests requests (after --warmup more of the same mix, not counted) by --concurrency clients in a
closed loop, above max_concurrency + max_queue so that some are refused with 429 (that client then waits the
Retry-After the server sent, with jitter, as the openai SDK does, before its next request). The mix, drawn from --seed:
  - complete (45%): direct, latent, relat, and TextMAS / LatentMAS agents (sequential), small settings; either
    endpoint, streaming or not;
  - disconnect (20%): the client leaves at a random point: a stream after a random number of lines, a plain
    request after a random delay;
  - deadline (15%): a relat request with a deadline (relat.timeout, or timeout on /v1/relat) of 0.05-1 s, at or
    below the time its work takes (on a tiny model some finish; on the embedded one, queued, none does);
  - malformed (20%): invalid JSON, bytes that are not UTF-8, wrong types, out-of-range values, an unknown model,
    a body over the limit, a wrong key, max_tokens past the context.
A streamed request's final status is its error event's (the 200 went out before the failure) or 200 when it ends
with its last event ([DONE] or `done`).

What it checks (exit 1 if any fails):
  - lost: 0. Every request gets a final status, or its client left on purpose; a connection error, a client
    timeout or a stream that stops without its last event is lost;
  - no 5xx but the designed 503 (not ready, no slot, stopped) and 504 (deadline);
  - every malformed request gets a 4xx;
  - GET /admin/status at the end (once the server is idle): no request running or waiting, every adapter slot
    free, the base weights' SHA-256 the one the server computed at start-up;
  - resident memory of the server at the end at most 5% above its value after the warm-up (both from the admin
    route);
  - /health still 200, and the server exits 0 on SIGTERM.
Figures go to --out (JSON) and a summary in markdown to stdout (bench/RESULTS.md, section 10).

By default it starts `relat serve` itself (the embedded model unless --model) with an API key of its own, and stops
it at the end; --url and --api-key soak a server that is already running (through a gateway, say) instead.

With --tenants N (issue 28), the server also gets a keys file of N tenants: `hostile` and N-1 polite ones. The
polite tenants share the mix above, request by request; the hostile one floods with --hostile-clients clients of
plain requests, ignoring Retry-After (a refusal is retried after 0.05 s), for as long as the measured requests run,
under its own limits from the keys file (--hostile-max-queue, --hostile-rpm). Its requests are reported apart and
must be neither lost nor 5xx either; added checks: every polite tenant got answers, and the hostile one got answers
and was refused with 429.

    python bench/soak.py                                  # the embedded model, 1,000 requests (minutes)
    python bench/soak.py --model /path/to/tiny --requests 200 --warmup 40 --max-concurrency 2 --max-queue 2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
QUESTIONS = ("What is the capital of France?", "Name three primary colours.", "Why is the sky blue?",
             "What is two plus three?", "Who wrote Hamlet?", "Give a synonym for happy.")
# A chat stream's error event carries OpenAI's error object only; its code says which status it stands for.
STREAM_CODES = {"deadline_exceeded": 504, "cancelled": 503, "not_ready": 503, "engine_busy": 503,
                "internal_error": 500}
DESIGNED_5XX = {503, 504}
MEMORY_GROWTH_LIMIT = 0.05
NO_TENANT = "wrong key"  # --tenants: the malformed requests sent with a key no tenant has


@dataclass
class Outcome:
    index: int
    kind: str  # complete, disconnect, deadline, malformed
    detail: str  # the method, or which malformed body
    endpoint: str  # chat or native
    stream: bool
    status: int | None = None  # final: HTTP status, or a stream's error event's
    left: bool = False  # the client went away on purpose before the end
    lost: str | None = None  # why a request got no final status (an exception, a stream cut short)
    retry_after: float | None = None  # seconds, from a 429's Retry-After
    seconds: float = 0.0


@dataclass
class Plan:
    kind: str
    detail: str
    endpoint: str
    stream: bool
    path: str
    content: bytes
    headers: dict
    leave_after_lines: int | None = None  # disconnect, streaming
    leave_after_seconds: float | None = None  # disconnect, not streaming


# -- the mix ----------------------------------------------------------------------------------------------------

METHODS = {  # the TTT fields of each kind of complete request; small, so that a request takes a second or so
    "direct": {"method": "direct"},
    "latent": {"method": "latent", "latent_steps": 4},
    "relat": {"method": "relat", "steps": 2, "latent_steps": 4, "rank": 4},
    "textmas": {"method": "direct", "agents": "sequential", "agent_max_tokens": 4},
    "latentmas": {"method": "latent", "agents": "sequential", "latent_steps": 2},
}


def body_for(endpoint: str, model: str, question: str, ttt: dict, stream: bool, max_tokens: int,
             extra: dict | None = None) -> dict:
    """A request of either endpoint: the TTT fields in `relat` for chat, at the top level for /v1/relat."""
    if endpoint == "chat":
        body = {"model": model, "messages": [{"role": "user", "content": question}], "relat": dict(ttt),
                "max_completion_tokens": max_tokens, "stream": stream}
    else:
        body = {"model": model, "question": question, **ttt, "max_tokens": max_tokens, "stream": stream}
    for key, value in (extra or {}).items():
        (body["relat"] if endpoint == "chat" and key == "timeout" else body)[key] = value
    return body


def malformed(rng: random.Random, model: str, key: str, max_body: int) -> tuple[str, str, bytes, dict]:
    """(name, path, body, extra headers) of one bad request, each of which must get a 4xx."""
    chat = "/v1/chat/completions"
    good = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 4}
    cases = [
        ("invalid-json", chat, b'{"model": "x", "messages": [', {}),
        ("not-utf8", chat, b'{"messages": "\xff\xfe"}', {}),
        ("not-an-object", chat, b"[1, 2, 3]", {}),
        ("wrong-type", chat, json.dumps({**good, "temperature": "hot"}).encode(), {}),
        ("no-messages", chat, json.dumps({**good, "messages": []}).encode(), {}),
        ("steps-out-of-range", chat, json.dumps({**good, "relat": {"steps": 10**9}}).encode(), {}),
        ("negative-rank", "/v1/relat", json.dumps({"question": "q", "rank": -1}).encode(), {}),
        ("blank-question", "/v1/relat", json.dumps({"question": "   "}).encode(), {}),
        ("past-the-context", chat, json.dumps({**good, "max_completion_tokens": 10**8}).encode(), {}),
        ("unknown-model", chat, json.dumps({**good, "model": "no-such-model"}).encode(), {}),
        ("over-the-body-limit", chat,
         json.dumps({**good, "messages": [{"role": "user", "content": "x" * (max_body + 1)}]}).encode(), {}),
        ("wrong-key", chat, json.dumps(good).encode(), {"Authorization": "Bearer sk-not-" + key[:4]}),
        ("assistant-last", chat, json.dumps({**good, "messages": [{"role": "assistant", "content": "Hi"}]}).encode(),
         {}),
    ]
    return rng.choice(cases)


def plan(count: int, rng: random.Random, model: str, key: str, max_body: int,
         tenant_keys: list[str] | None = None) -> list[Plan]:
    """The mix; with tenant_keys, request i is sent with tenant_keys[i % len] (malformed ones too)."""
    plans = []
    for index in range(count):
        sender = tenant_keys[index % len(tenant_keys)] if tenant_keys else key
        auth = {"Authorization": f"Bearer {sender}", "Content-Type": "application/json"}
        kind = rng.choices(("complete", "disconnect", "deadline", "malformed"), (45, 20, 15, 20))[0]
        endpoint = rng.choice(("chat", "native"))
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/relat"
        stream = rng.random() < 0.5
        question = rng.choice(QUESTIONS)
        if kind == "malformed":
            name, path, content, headers = malformed(rng, model, key, max_body)
            plans.append(Plan(kind, name, "chat" if path.endswith("completions") else "native", False, path,
                              content, {**auth, **headers}))
            continue
        if kind == "deadline":
            detail, ttt = "relat", {"method": "relat", "steps": 3, "latent_steps": 8, "rank": 4}
            extra = {"timeout": round(rng.uniform(0.05, 1.0), 2)}
        else:
            detail = rng.choice(list(METHODS))
            ttt, extra = METHODS[detail], None
        body = body_for(endpoint, model, question, ttt, stream, rng.randint(4, 16), extra)
        item = Plan(kind, detail, endpoint, stream, path, json.dumps(body).encode(), auth)
        if kind == "disconnect":
            if stream:
                item.leave_after_lines = rng.randint(0, 8)
            else:
                item.leave_after_seconds = rng.uniform(0.0, 2.0)
        plans.append(item)
    return plans


# -- sending ----------------------------------------------------------------------------------------------------

def stream_status(line: str, endpoint: str, event: str | None) -> int | None:
    """The final status a stream's line settles, if it is its last event: 200, or its error's status."""
    if not line.startswith("data: "):
        return None
    data = line[6:]
    if endpoint == "chat":
        if data == "[DONE]":
            return 200
        error = json.loads(data).get("error")
        return None if error is None else STREAM_CODES.get(error.get("code"), 500)
    if event == "done":
        return 200
    if event == "error":
        return int(json.loads(data)["status"])
    return None


def settle(outcome: Outcome, response: httpx.Response) -> None:
    outcome.status = response.status_code
    if response.status_code == 429:
        outcome.retry_after = float(response.headers.get("retry-after", 1))


async def send(client: httpx.AsyncClient, index: int, item: Plan) -> Outcome:
    outcome = Outcome(index, item.kind, item.detail, item.endpoint, item.stream)
    started = time.monotonic()
    try:
        if item.stream:
            await read_stream(client, item, outcome)
        elif item.leave_after_seconds is not None:
            try:
                response = await asyncio.wait_for(client.post(item.path, content=item.content, headers=item.headers),
                                                  item.leave_after_seconds)
                settle(outcome, response)
            except asyncio.TimeoutError:  # the request is cancelled, its connection closed: the client left
                outcome.left = True
        else:
            settle(outcome, response=await client.post(item.path, content=item.content, headers=item.headers))
    except httpx.HTTPError as error:
        outcome.lost = f"{type(error).__name__}: {error}"
    outcome.seconds = time.monotonic() - started
    return outcome


async def read_stream(client: httpx.AsyncClient, item: Plan, outcome: Outcome) -> None:
    async with client.stream("POST", item.path, content=item.content, headers=item.headers) as response:
        if response.status_code != 200:
            await response.aread()
            settle(outcome, response)
            return
        lines, event = 0, None
        async for line in response.aiter_lines():
            if item.leave_after_lines is not None and lines >= item.leave_after_lines:
                outcome.left = True  # leaving the block closes the connection mid-stream
                return
            lines += 1
            if line.startswith("event: "):
                event = line[7:]
            status = stream_status(line, item.endpoint, event)
            if status is not None:
                outcome.status = status
                return
        outcome.lost = f"the stream ended after {lines} lines without its last event"


async def closed_loop(url: str, plans: list[Plan], concurrency: int, client_timeout: float, offset: int = 0
                      ) -> list[Outcome]:
    """`concurrency` clients, each sending the next request once its last one ended."""
    pending = collections.deque(enumerate(plans, offset))
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=client_timeout, limits=limits) as client:
        async def client_loop() -> None:
            while pending:
                index, item = pending.popleft()
                outcome = await send(client, index, item)
                outcomes.append(outcome)
                if outcome.retry_after is not None:  # as the openai SDK does: Retry-After, with jitter
                    await asyncio.sleep(outcome.retry_after * random.uniform(1.0, 1.5))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return sorted(outcomes, key=lambda o: o.index)


async def soak_with_flood(url: str, plans: list[Plan], concurrency: int, client_timeout: float, hostile: Plan,
                          hostile_clients: int) -> tuple[list[Outcome], list[Outcome]]:
    """The closed loop of the polite requests, with the hostile tenant's flood beside it until they are done: each
    of its clients sends the same plain request again at once, after 0.05 s when refused (no Retry-After)."""
    flooded: list[Outcome] = []
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=hostile_clients, max_keepalive_connections=hostile_clients)

    async def flooder(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            outcome = await send(client, -1 - len(flooded), hostile)
            flooded.append(outcome)
            if outcome.status != 200:
                await asyncio.sleep(0.05)

    async with httpx.AsyncClient(base_url=url, timeout=client_timeout, limits=limits) as client:
        flood = [asyncio.create_task(flooder(client)) for _ in range(hostile_clients)]
        try:
            outcomes = await closed_loop(url, plans, concurrency, client_timeout)
        finally:
            done.set()
            await asyncio.gather(*flood)  # each client's last request ends, answered or refused
    return outcomes, flooded


# -- the server -------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_keys_file(folder: Path, tenants: dict[str, str], args: argparse.Namespace) -> Path:
    """The keys file of --tenants: each tenant's key digest; the hostile one's limits."""
    entries = []
    for name, key in tenants.items():
        entry = {"name": name, "key_sha256": hashlib.sha256(key.encode()).hexdigest()}
        if name == "hostile":
            entry |= {"max_queue": args.hostile_max_queue, "requests_per_minute": args.hostile_rpm}
        entries.append(entry)
    path = folder / "keys.json"
    path.write_text(json.dumps({"tenants": entries}))
    return path


def start_server(args: argparse.Namespace, key: str, log: Path, keys_file: Path | None = None
                 ) -> tuple[subprocess.Popen, str]:
    """`relat serve` with this soak's settings; returns once /ready answers 200."""
    port = free_port()
    relat = Path(sys.executable).with_name("relat")
    command = [str(relat), "serve", "--host", "127.0.0.1", "--port", str(port),
               "--max-concurrency", str(args.max_concurrency), "--max-queue", str(args.max_queue),
               "--request-timeout", str(args.request_timeout), "--torch-threads", str(args.threads),
               "--max-body-bytes", str(args.max_body_bytes), "--log-level", "warning"]
    if args.model:
        command += ["--model", args.model]
    # The key goes through the environment, not the command line that `ps` shows.
    env = {**os.environ, "RELAT_API_KEYS": key, "OMP_NUM_THREADS": str(args.threads)}
    if keys_file is not None:
        env["RELAT_KEYS_FILE"] = str(keys_file)
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


def admin_status(url: str, key: str) -> dict:
    response = httpx.get(f"{url}/admin/status", headers={"Authorization": f"Bearer {key}"}, timeout=120)
    response.raise_for_status()
    return response.json()


def idle_status(url: str, key: str, limit: float = 120.0) -> dict:
    """The admin status once nothing runs or waits (requests whose client left end at the engine's next step)."""
    deadline = time.monotonic() + limit
    while True:
        status = admin_status(url, key)
        idle = not (status["requests_running"] or status["requests_waiting"] or status["adapter_slots_in_use"])
        if idle or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


class MemorySampler(threading.Thread):
    """The server's resident set (VmRSS) every `every` seconds, when it is a local process: whether memory levels
    off or keeps growing shows here, where two figures could not tell."""

    def __init__(self, pid: int, origin: float, every: float = 2.0):
        super().__init__(daemon=True)
        self.pid, self.origin, self.every = pid, origin, every
        self.samples: list[tuple[float, int]] = []  # (seconds since start, bytes)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every):
            try:
                with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
                    kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                return
            self.samples.append((round(time.monotonic() - self.origin, 1), kib * 1024))

    def stop(self) -> list[tuple[float, int]]:
        self._stop_event.set()
        self.join()
        return self.samples


def model_name(url: str, key: str) -> str:
    response = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    return response.json()["data"][0]["id"]


# -- report -----------------------------------------------------------------------------------------------------

def final_label(outcome: Outcome) -> str:
    if outcome.lost is not None:
        return "lost"
    if outcome.left:
        return "client left"
    return str(outcome.status)


def checks(outcomes: list[Outcome], warm: dict, end: dict) -> dict[str, dict]:
    lost = [o for o in outcomes if o.lost is not None]
    server_errors = [o for o in outcomes if o.status is not None and o.status >= 500 and o.status not in DESIGNED_5XX]
    not_refused = [o for o in outcomes if o.kind == "malformed" and not (o.status and 400 <= o.status < 500)]
    growth = None
    if warm.get("resident_memory_bytes") and end.get("resident_memory_bytes"):
        growth = end["resident_memory_bytes"] / warm["resident_memory_bytes"] - 1
    return {
        "no request lost": {"ok": not lost, "lost": len(lost), "examples": [o.lost for o in lost[:5]]},
        "no 5xx but 503 and 504": {"ok": not server_errors, "count": len(server_errors)},
        "every malformed request refused with a 4xx": {
            "ok": not not_refused, "count": len(not_refused),
            "examples": [f"{o.detail}: {o.status}" for o in not_refused[:5]]},
        "idle at the end": {"ok": end["requests_running"] == 0 and end["requests_waiting"] == 0,
                            "running": end["requests_running"], "waiting": end["requests_waiting"]},
        "every adapter slot free": {"ok": end["adapter_slots_in_use"] == 0, "in_use": end["adapter_slots_in_use"],
                                    "slots": end["adapter_slots"]},
        "base weights unchanged": {"ok": end["base_weights_unchanged"], "sha256": end["base_weights_sha256"],
                                   "at_start": end["base_weights_sha256_at_start"]},
        "resident memory growth under 5%": {"ok": growth is not None and growth < MEMORY_GROWTH_LIMIT,
                                            "after_warmup_bytes": warm.get("resident_memory_bytes"),
                                            "end_bytes": end.get("resident_memory_bytes"), "growth": growth},
    }


def tenant_checks(by_tenant: dict[str, dict[str, int]]) -> dict[str, dict]:
    """With --tenants: every polite tenant answered; the hostile one answered too, and refused at its limits."""
    polite = {name: counts for name, counts in by_tenant.items() if name not in ("hostile", NO_TENANT)}
    hostile = by_tenant.get("hostile", {})
    return {
        "every polite tenant answered": {"ok": bool(polite) and all(c.get("200") for c in polite.values()),
                                         "answered": {name: c.get("200", 0) for name, c in polite.items()}},
        "the hostile tenant answered and refused with 429": {
            "ok": bool(hostile.get("200")) and bool(hostile.get("429")),
            "answered": hostile.get("200", 0), "refused": hostile.get("429", 0)},
    }


def summary(outcomes: list[Outcome]) -> dict:
    by_status = collections.Counter(final_label(o) for o in outcomes)
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for outcome in outcomes:
        by_kind[outcome.kind][final_label(outcome)] += 1
    return {"by_status": dict(sorted(by_status.items())),
            "by_kind": {kind: dict(sorted(counts.items())) for kind, counts in sorted(by_kind.items())},
            "streamed": sum(o.stream for o in outcomes)}


def markdown(report: dict) -> str:
    statuses = sorted({label for counts in report["by_kind"].values() for label in counts})
    lines = [f"Soak: {report['requests']} requests at concurrency {report['concurrency']} against max_concurrency "
             f"{report['server']['max_concurrency']} + max_queue {report['server']['max_queue']}, "
             f"{report['seconds']:.0f} s ({report['model']}, {report['date']})", "",
             "| kind | " + " | ".join(statuses) + " | all |", "|---|" + "---:|" * (len(statuses) + 1)]
    for kind, counts in report["by_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(s, 0)) for s in statuses)
                     + f" | {sum(counts.values())} |")
    totals = report["by_status"]
    lines.append("| **all** | " + " | ".join(f"**{totals.get(s, 0)}**" for s in statuses)
                 + f" | **{report['requests']}** |")
    if report.get("by_tenant"):
        lines += ["", "By tenant (the hostile one's flood is apart from the requests counted above):", ""]
        lines += [f"- {name}: " + ", ".join(f"{label} x{count}" for label, count in sorted(counts.items()))
                  for name, counts in report["by_tenant"].items()]
    lines += ["", "| check | result |", "|---|---|"]
    for name, check in report["checks"].items():
        details = ", ".join(f"{k} {v}" for k, v in check.items() if k not in ("ok", "examples", "sha256", "at_start"))
        lines.append(f"| {name} | {'pass' if check['ok'] else 'FAIL'}{': ' + details if details else ''} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests counted (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=100, help="requests of the same mix before, not counted")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="clients at once (default: max_concurrency + max_queue + 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="the model relat serve loads (default: the embedded one)")
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--max-body-bytes", type=int, default=64 * 1024)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--url", default=None, help="soak this running server instead of starting one")
    parser.add_argument("--api-key", default=None, help="its key (with --url; needed for the admin route)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON report (default bench/results/soak-<date>.json)")
    parser.add_argument("--tenants", type=int, default=0,
                        help="N >= 2: a keys file of N tenants, one hostile (flooding), the others sharing the mix")
    parser.add_argument("--hostile-clients", type=int, default=None,
                        help="the hostile tenant's clients at once (default: 2 x (max_concurrency + max_queue))")
    parser.add_argument("--hostile-max-queue", type=int, default=2, help="the hostile tenant's max_queue")
    parser.add_argument("--hostile-rpm", type=int, default=600, help="the hostile tenant's requests_per_minute")
    args = parser.parse_args(argv)
    if args.url and not args.api_key:
        parser.error("--url needs --api-key: the admin route needs a key")
    if args.tenants == 1 or (args.tenants and args.url):
        parser.error("--tenants takes 2 or more, and a server this soak starts (it writes the keys file)")
    if args.hostile_clients is None:
        args.hostile_clients = 2 * (args.max_concurrency + args.max_queue)
    if args.concurrency is None:
        args.concurrency = args.max_concurrency + args.max_queue + 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    key = args.api_key or "sk-soak-" + secrets.token_hex(8)
    server = None
    log = Path(tempfile.mkdtemp(prefix="relat-soak-")) / "relat.log"
    tenants = {name: f"sk-soak-{name}-" + secrets.token_hex(8)
               for name in ["hostile"] + [f"polite{i}" for i in range(1, args.tenants)]} if args.tenants else {}
    keys_file = write_keys_file(log.parent, tenants, args) if tenants else None
    polite_keys = [k for name, k in tenants.items() if name != "hostile"] or None
    flooded: list[Outcome] = []
    if args.url:
        url = args.url.rstrip("/")
    else:
        server, url = start_server(args, key, log, keys_file)
    origin = time.monotonic()
    sampler = MemorySampler(server.pid, origin) if server is not None else None
    if sampler is not None:
        sampler.start()
    try:
        model = model_name(url, key)
        rng = random.Random(args.seed)
        warmup = plan(args.warmup, rng, model, key, args.max_body_bytes, polite_keys)
        measured = plan(args.requests, rng, model, key, args.max_body_bytes, polite_keys)
        client_timeout = args.request_timeout + 60
        asyncio.run(closed_loop(url, warmup, args.concurrency, client_timeout))
        warm = idle_status(url, key)
        warmed_at = time.monotonic()
        started = time.monotonic()
        if tenants:
            hostile = Plan("hostile", "direct", "chat", False, "/v1/chat/completions", json.dumps(body_for(
                "chat", model, QUESTIONS[0], METHODS["direct"], False, 8)).encode(),
                {"Authorization": f"Bearer {tenants['hostile']}", "Content-Type": "application/json"})
            outcomes, flooded = asyncio.run(soak_with_flood(url, measured, args.concurrency, client_timeout, hostile,
                                                            args.hostile_clients))
        else:
            outcomes = asyncio.run(closed_loop(url, measured, args.concurrency, client_timeout))
        seconds = time.monotonic() - started
        end = idle_status(url, key)
        healthy = httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        timeline = sampler.stop() if sampler is not None else []
        exit_code = stop_server(server) if server is not None else None
    by_tenant = {}
    if tenants:
        names = {k: name for name, k in tenants.items()}
        for outcome, item in zip(outcomes, measured, strict=True):
            sender = names.get(item.headers["Authorization"].removeprefix("Bearer "), NO_TENANT)
            counts = by_tenant.setdefault(sender, {})
            counts[final_label(outcome)] = counts.get(final_label(outcome), 0) + 1
        by_tenant["hostile"] = dict(collections.Counter(final_label(o) for o in flooded))
    report = {
        "date": datetime.date.today().isoformat(), "model": model, "requests": args.requests,
        "warmup": args.warmup, "concurrency": args.concurrency, "seed": args.seed, "seconds": seconds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "server": {"max_concurrency": args.max_concurrency, "max_queue": args.max_queue,
                   "request_timeout": args.request_timeout, "threads": args.threads, "url": args.url,
                   "exit_code": exit_code},
        **summary(outcomes),
        "tenants": args.tenants, "by_tenant": by_tenant,
        "checks": checks(outcomes + flooded, warm, end) | (tenant_checks(by_tenant) if tenants else {}) | {
            "healthy at the end": {"ok": healthy},
            # SIGTERM drains and exits 0; a server soaked through --url is not ours to stop.
            "clean shutdown": {"ok": exit_code in (0, None), "exit_code": exit_code}},
        "admin_after_warmup": warm, "admin_at_end": end,
        # (seconds, bytes) from the start of the warm-up; the warm-up ended at warmup_seconds
        "memory_timeline": timeline, "warmup_seconds": round(warmed_at - origin, 1),
        "outcomes": [asdict(o) for o in outcomes],
    }
    out = args.out or BENCH / "results" / f"soak-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    print(f"\nreport: {out}" + ("" if args.url else f"; server log: {log}"))
    return 0 if all(check["ok"] for check in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
