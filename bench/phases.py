"""Per-phase time and peak memory of one `direct`, `latent` and `relat` request on the embedded model.

What it measures and why: a `relat` request pays for N training steps (each a forward and backward pass through
the prompt, the L latent steps and the reconstruction) before its first token, and training keeps activations
for the backward pass; this shows where the seconds and the memory go, for the engine's defaults and for the
paper's setting (L=16 latent steps, N=5 steps, adapter on while answering, arXiv 2606.06252).

How: each method x setting runs in a fresh subprocess (so one's memory peak cannot hide another's), builds the
engine, runs one warm-up request, then --repeats timed requests of the same question (greedy, --max-tokens);
times are medians of the engine's own trace (train, think = prefill + latent thought with the final weights,
first token, decode, total). Decoding length differs by method (each stops when the model does), so ms/token is
given too. Memory is resident set size from /proc/self/status: the kernel's high-water mark VmHWM is reset before
each request (writing 5 to /proc/self/clear_refs) and read when each training step ends and when the request
finishes, so "train" and "answer" peaks are per phase. They are taken over all requests, the warm-up included
(the allocator keeps the first request's memory, so later peaks hide under it), and shown with their excess over
the RSS after the engine was built and every weight read once (they are memory-mapped). Where the reset is
refused the peak is the whole process's, model load included, and the table says so. tracemalloc sees none of
torch's allocations and psutil gives only the current RSS on Linux, hence the kernel's counter.

    python bench/phases.py [--repeats 3] [--threads 1] [--max-tokens 32] [--agents]

--agents measures the six combinations of direct / latent / relat with a single model and with the sequential
team (four agents, TextMAS agents writing up to agent_max_tokens each) instead; "tokens" is then every token
generated, the agents' included, so ms/token is the answer's decode time over them all only for single models.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from relat_core import Engine, Finished, Request, SamplingParams, TrainStep, load_model

QUESTION = "What is the largest planet in the solar system?"
SETTINGS: dict[str, dict[str, object]] = {
    "defaults": {},
    "after thought": {"answer_context": "thought"},  # the small-model default before issue 9
    "paper": {"latent_steps": 16, "steps": 5, "adapter_during_answer": True, "follow_up": "bridge",
              "answer_context": "thought"},
    "sequential": {"agents": "sequential"},  # the engine's defaults otherwise (issue 10)
}
CASES = [("direct", "defaults"), ("latent", "defaults"), ("relat", "defaults"), ("relat", "after thought"),
         ("latent", "paper"), ("relat", "paper")]  # `direct` ignores the TTT settings: one row
AGENT_CASES = [(method, setting) for method in ("direct", "latent", "relat") for setting in ("defaults", "sequential")]
PHASES = ("train_s", "think_s", "first_token_s", "decode_s", "total_s")
RESULT_PREFIX = "PHASES-RESULT "


# -- memory -----------------------------------------------------------------------------------------------------

def status_mib(field: str, pid: int | str = "self") -> float | None:
    """A `Vm...` line of a process's /proc/PID/status in MiB, or None off Linux."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_mib() -> float:
    """Peak RSS since the last reset (VmHWM), else the process's peak from getrusage."""
    value = status_mib("VmHWM")
    if value is not None:
        return value
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


def reset_peak(pid: int | str = "self") -> bool:
    """Reset a process's VmHWM to its current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


# -- one method x setting, in its own process -------------------------------------------------------------------

def measure_once(engine: Engine, request: Request) -> dict:
    """Run one request; peaks per phase (train: up to the last training step, answer: the rest)."""
    resettable = reset_peak()
    train_peak, result = None, None
    for event in engine.generate(request):
        if isinstance(event, TrainStep):
            train_peak = max(train_peak or 0.0, peak_mib())
            reset_peak()
        elif isinstance(event, Finished):
            result = event.result
    assert result is not None, "generate ended without a result"
    timings = result.trace.timings
    return {"timings": {phase: timings.get(phase, 0.0) for phase in PHASES},
            "tokens": result.usage.completion_tokens, "train_peak": train_peak, "answer_peak": peak_mib(),
            "resettable": resettable, "steps": len(result.trace.steps), "text": result.text,
            "adapter_in_answer": result.trace.adapter_during_answer, "answer_after": result.trace.answer_context}


def touch_weights(model: torch.nn.Module) -> None:
    """Read every weight once: safetensors are memory-mapped and paged in by the first forward pass (about 400 MiB
    for the embedded model), which would otherwise count as the first request's memory."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.sum()


def worker(method: str, setting: str, repeats: int, threads: int, max_tokens: int) -> dict:
    """One warm-up and `repeats` timed requests; memory peaks over all of them, the warm-up included."""
    torch.set_num_threads(threads)
    engine = Engine(load_model())
    touch_weights(engine.model)
    rss_loaded = status_mib("VmRSS")
    ttt = engine.defaults.replace(method=method, **SETTINGS[setting])
    request = Request([{"role": "user", "content": QUESTION}], ttt, SamplingParams(max_tokens=max_tokens))
    # The warm-up pays first-call costs in time, and its memory stays with the process (the allocator keeps it),
    # so later requests' peaks hide under it: peaks come from every run, times only from the timed ones.
    runs = [measure_once(engine, request) for _ in range(repeats + 1)]
    timed = runs[1:]
    medians = {phase: statistics.median(run["timings"][phase] for run in timed) for phase in PHASES}
    train_peaks = [run["train_peak"] for run in runs if run["train_peak"] is not None]
    return {
        "method": method, "setting": setting, "ttt": {k: getattr(ttt, k) for k in ("latent_steps", "steps",
                                                                                    "follow_up")},
        "adapter_in_answer": timed[0]["adapter_in_answer"], "answer_after": timed[0]["answer_after"],
        "repeats": repeats, "medians": medians, "tokens": statistics.median(run["tokens"] for run in timed),
        "steps": timed[0]["steps"], "rss_loaded": rss_loaded, "rss_end": status_mib("VmRSS"),
        "train_peak": max(train_peaks) if train_peaks else None, "answer_peak": max(r["answer_peak"] for r in runs),
        "resettable": all(run["resettable"] for run in runs), "text": timed[0]["text"],
        "parameters": engine.num_parameters, "model": engine.name,
    }


def run_case(method: str, setting: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", method, setting, "--repeats",
               str(args.repeats), "--threads", str(args.threads), "--max-tokens", str(args.max_tokens)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"{method}/{setting} failed (exit {completed.returncode}):\n{completed.stderr[-2000:]}")


# -- report -----------------------------------------------------------------------------------------------------

def machine_info(threads: int) -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return {"CPU": cpu, "cores": f"{os.cpu_count()} ({usable} usable)", "torch threads": str(threads),
            "torch": torch.__version__, "python": platform.python_version(), "load average at start": load,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _mib(value: float | None, base: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if base is None else f"{value:,.0f} (+{max(value - base, 0):,.0f})"


def markdown(rows: list[dict], info: dict[str, str], args: argparse.Namespace) -> str:
    first = rows[0]
    lines = [f"Model {first['model']} ({first['parameters'] / 1e6:.1f} M parameters, fp32, CPU); question "
             f"{QUESTION!r}, greedy, at most {args.max_tokens} tokens; times: median of {args.repeats} after a "
             "warm-up; memory: RSS after the engine is built (weights paged in), and peak RSS (+ over that) per "
             "phase over all requests, each method in a fresh process.", "",
             " · ".join(f"{key}: {value}" for key, value in info.items()), "",
             "| method | setting (L, N, adapter in answer, answer after) | train s | think s | first token s "
             "| decode s | tokens | ms/token | total s | RSS after load MiB | peak train MiB | peak answer MiB "
             "| RSS at end MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m, ttt = row["medians"], row["ttt"]
        setting = ("sequential" if row["setting"] == "sequential" else "–") if row["method"] == "direct" else \
            f"{row['setting']} ({ttt['latent_steps']}, {ttt['steps'] if row['method'] == 'relat' else '–'}, " \
            f"{'on' if row['adapter_in_answer'] else 'off'}, " \
            f"{'question' if row['answer_after'] == 'question' else 'thought, ' + ttt['follow_up']})"
        per_token = 1000 * m["decode_s"] / row["tokens"] if row["tokens"] else 0.0
        lines.append(
            f"| {row['method']} | {setting} | {m['train_s']:.2f} | {m['think_s']:.2f} | {m['first_token_s']:.2f} | "
            f"{m['decode_s']:.2f} | {row['tokens']:.0f} | {per_token:.0f} | {m['total_s']:.2f} | "
            f"{_mib(row['rss_loaded'])} | {_mib(row['train_peak'], row['rss_loaded'])} | "
            f"{_mib(row['answer_peak'], row['rss_loaded'])} | {_mib(row['rss_end'])} |")
    if not all(row["resettable"] for row in rows):
        lines += ["", "Peaks could not be reset per request here: they are the whole process's, load included."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="measured requests per method (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--agents", action="store_true",
                        help="direct / latent / relat, single and sequential agents (issue 10), instead")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SETTING"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = worker(*args.worker, args.repeats, args.threads, args.max_tokens)
        print(RESULT_PREFIX + json.dumps(result))
        return
    info = machine_info(args.threads)
    rows = []
    for method, setting in AGENT_CASES if args.agents else CASES:
        print(f"measuring {method} / {setting} ...", file=sys.stderr, flush=True)
        rows.append(run_case(method, setting, args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=1), encoding="utf-8")
    print(markdown(rows, info, args))


if __name__ == "__main__":
    main()
