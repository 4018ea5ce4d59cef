"""Resident memory per weight format (`--weights`, issue 29): after loading, and after a request.

What it measures and why: the point of int8 and int4 weights is as much memory as speed, and the process holds
more than its tensors (the interpreter and torch's libraries, the allocator's free blocks, file pages still
mapped). Each format runs in a process of its own: `load_model(weights=...)` and an `Engine`, as `relat serve` loads
them, then one relat request at the served defaults (16 tokens). After each, the allocator's free memory goes back
to the system (gc, then glibc's malloc_trim, as /admin/status does before it reads the figure) and
/proc/self/status gives VmRSS, split into anonymous memory and file-backed pages (RssAnon, RssFile). "state" is
the bytes of the model's parameters and buffers, each storage counted once.

    python bench/resident.py [--weights fp32 int8 int4] [--threads 1] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def resident_mib() -> dict[str, float]:
    from relat_core.memory import return_free_memory

    return_free_memory()  # gc, then glibc's malloc_trim, as /admin/status does before it reads
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def measure(weights: str, threads: int) -> dict:
    """In this process: load, measure, one request, measure."""
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(threads)
    before = resident_mib()
    from relat_core import Engine, Request, SamplingParams, TTTParams, load_model

    loaded = load_model(weights=weights)
    engine = Engine(loaded)
    storages = {}
    for tensor in [*loaded.model.parameters(), *loaded.model.buffers()]:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    after_load = resident_mib()
    request = Request([{"role": "user", "content": "What is the chemical symbol for gold?"}],
                      TTTParams(method="relat", cache=False), SamplingParams(max_tokens=16, temperature=0.0))
    events = list(engine.generate(request))
    assert events and type(events[-1]).__name__ == "Finished", events[-1:]
    after_request = resident_mib()
    return {"weights": weights, "threads": threads, "state_mib": sum(storages.values()) / 2**20,
            "interpreter": before, "after_load": after_load, "after_request": after_request,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def table(records: list[dict]) -> str:
    lines = ["| weights | state MiB | after load: RSS (anon + file) MiB | after a request: RSS (anon + file) MiB |",
             "|---|---|---|---|"]
    for r in records:
        load, request = r["after_load"], r["after_request"]
        lines.append(f"| {r['weights']} | {r['state_mib']:,.0f} | {load['VmRSS']:,.0f} ({load['RssAnon']:,.0f} + "
                     f"{load['RssFile']:,.0f}) | {request['VmRSS']:,.0f} ({request['RssAnon']:,.0f} + "
                     f"{request['RssFile']:,.0f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", nargs="+", choices=("fp32", "int8", "int4"), default=["fp32", "int8", "int4"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="append the records here (JSON lines)")
    parser.add_argument("--inside", choices=("fp32", "int8", "int4"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        print(json.dumps(measure(args.inside, args.threads)))
        return []
    records = []
    for weights in args.weights:  # a process each: one format's pages must not count in another's
        output = subprocess.run([sys.executable, __file__, "--inside", weights, "--threads", str(args.threads)],
                                check=True, capture_output=True, text=True).stdout
        records.append(json.loads(output.strip().splitlines()[-1]))
    print(table(records))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", encoding="utf-8") as out:
            out.writelines(json.dumps(r) + "\n" for r in records)
    return records


if __name__ == "__main__":
    main()
