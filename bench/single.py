"""One request alone against the naive loop, paired question by question (issue 15's single-request ratio).

What it measures and why: issue 15 reports a single request's latency as a ratio to the naive transformers + peft
loop's (bench/naive.py). bench/load.py times its C=1 run and its naive loop minutes apart, and this machine's speed
drifts by more than the gap between the two in that time (bench/RESULTS.md, section 16). Here every variant runs
in a worker process of its own (its own model and thread team), blocked on its input while another works; each
round sends the same question to every worker in turn, in alternating order, so that each of a variant's ratios to
the naive loop is taken within one round, a few minutes apart at most.

Variants:
  - engine: `Engine(loaded, max_rank=16, num_slots=1)` on fp32 weights, packed (`relat serve --weights fp32`; the
    served default, `--weights auto`, stores the embedded model in int4: engine-int4 below);
  - engine-plain: the same on plain weights (`load_model(pack_weights=False)`, `relat serve --no-pack-weights`);
  - naive: bench/naive.py's `naive_request`;
  - engine-int8, engine-int4: the engine with its frozen linear layers stored low-bit (`load_model(weights=...)`,
    `relat serve --weights int8|int4`);
  - engine@DIR (--code DIR): the engine of another checkout, such as a `git worktree` of an older commit, driven by
    that checkout's own bench/load.py.
Every request is bench/load.py's paper setting (relat, L=16, N=5, rank 8, bridge, adapter on while answering),
greedy, exactly --max-tokens answer tokens (EOS ignored), trained (no adapter cache); questions are
knowledge_dev's first, round 0 a warm-up that is not counted. Records go to bench/results/single-<date>.jsonl
(--results elsewhere), each with the worker's resident peak so far (`peak_rss_mib`); the table gives each variant's
median seconds and its per-round ratios to naive.

    python bench/single.py [--rounds 4] [--threads 2] [--variants engine engine-plain naive] [--code DIR]
    python bench/single.py --rounds 1 --latent-steps 1 --steps 1 --max-tokens 2 --results /tmp/single.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
VARIANTS = ("engine", "engine-plain", "naive", "engine-int8", "engine-int4")
# The engine with its frozen linear layers stored low-bit (`relat serve --weights`, relat_core/quantized.py).
WEIGHTS = {"engine-int8": "int8", "engine-int4": "int4"}


# -- worker: one variant, one model, questions on stdin ----------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    """Load the variant's model, say READY, then answer each question read from stdin with one JSON line."""
    sys.path[:0] = [str(args.code_root), str(args.code_root / "bench")]  # that checkout's relat_core and bench/
    import torch

    torch.set_num_threads(args.threads)
    import load  # bench/load.py of the checkout: its paper setting, request and closed loop

    setting = load.parse_args(["--latent-steps", str(args.latent_steps), "--steps", str(args.steps),
                               "--max-tokens", str(args.max_tokens)])
    from relat_core import load_model

    if args.worker == "naive":
        from naive import naive_request

        loaded = load_model(pack_weights=False)  # the plain transformers model, as users run it
        load.touch_weights(loaded.model)

        def answer(question: str) -> dict:
            result = naive_request(loaded, question, latent_steps=args.latent_steps, steps=args.steps,
                                   max_tokens=args.max_tokens)
            return {"train_s": result["train_s"], "first_token_s": result["first_token_s"]}
    else:
        from relat_core import Engine

        # No argument for the default: an older checkout's load_model may have no pack_weights.
        if args.worker in WEIGHTS:
            loaded = load_model(weights=WEIGHTS[args.worker])
        else:
            loaded = load_model(pack_weights=False) if args.worker == "engine-plain" else load_model()
        load.touch_weights(loaded.model)
        engine = Engine(loaded, max_rank=16, num_slots=1)  # the server's max rank

        def answer(question: str) -> dict:
            record = load.Record("engine", 1, 0, question, 0.0)
            load.closed_loop(engine, 1, [load.engine_request(question, setting)], [record], time.perf_counter())
            if getattr(record, "error", None):  # an older checkout's Record may have no error field
                raise RuntimeError(record.error)
            return {key: record.timings[key] for key in ("train_s", "first_token_s", "decode_s")}

    print("READY", flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        phases = answer(json.loads(line))
        seconds = time.perf_counter() - start
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the worker's resident peak so far
        print(json.dumps({"seconds": seconds, **phases, "peak_rss_mib": round(peak_mib)}), flush=True)


# -- driver ------------------------------------------------------------------------------------------------------

def start_worker(variant: str, code_root: Path, args: argparse.Namespace) -> subprocess.Popen:
    kind = "engine" if variant.startswith("engine@") else variant
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--code-root", str(code_root),
               "--threads", str(args.threads), "--latent-steps", str(args.latent_steps), "--steps", str(args.steps),
               "--max-tokens", str(args.max_tokens)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=code_root)
    for line in process.stdout:  # loading messages go to stderr; stdout carries READY, then one line per answer
        if line.strip() == "READY":
            return process
    raise RuntimeError(f"the {variant} worker exited before it was ready (code {process.wait()})")


def ask(process: subprocess.Popen, question: str) -> dict:
    process.stdin.write(json.dumps(question) + "\n")
    process.stdin.flush()
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"a worker exited (code {process.wait()})")
    return json.loads(line)


def table(records: list[dict], variants: list[str]) -> str:
    """Median seconds per variant, and each timed round's ratio to the naive loop's request on the same question."""
    naive = {r["round"]: r["seconds"] for r in records if r["variant"] == "naive"}
    lines = ["| variant | requests | median s | median train s | ratio to naive, per round | median ratio |",
             "|---|---|---|---|---|---|"]
    for variant in variants:
        own = [r for r in records if r["variant"] == variant]
        ratios = [r["seconds"] / naive[r["round"]] for r in own if r["round"] in naive]
        ratio_text = ", ".join(f"{ratio:.2f}" for ratio in ratios) if variant != "naive" else "–"
        median_ratio = f"{statistics.median(ratios):.2f}" if ratios and variant != "naive" else "–"
        lines.append(f"| {variant} | {len(own)} | {statistics.median(r['seconds'] for r in own):.2f} | "
                     f"{statistics.median(r['train_s'] for r in own):.2f} | {ratio_text} | {median_ratio} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict]:
    if str(BENCH) not in sys.path:  # loaded by path (the tests), not run as a script
        sys.path.insert(0, str(BENCH))
    import load  # bench/load.py, beside this file: the questions

    here = BENCH.parent
    roots = {variant: here for variant in args.variants}
    roots.update({f"engine@{code}": Path(code).resolve() for code in args.code})
    variants = list(roots)  # the order of the table
    workers = {}
    try:
        for variant in variants:  # one at a time: loading is work too
            print(f"starting {variant} ...", file=sys.stderr, flush=True)
            workers[variant] = start_worker(variant, roots[variant], args)
        questions = load.questions(args.rounds + 1)
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        records = []
        for number, question in enumerate(questions):
            order = variants if number % 2 == 0 else variants[::-1]
            for variant in order:
                record = {"round": number, "variant": variant, "question": question, **ask(workers[variant], question),
                          "latent_steps": args.latent_steps, "steps": args.steps, "max_tokens": args.max_tokens,
                          "threads": args.threads, "date": date}
                print(json.dumps(record), file=sys.stderr, flush=True)
                if number:  # round 0 warms every worker up
                    records.append(record)
        return records
    finally:
        for process in workers.values():
            process.stdin.close()
            process.wait()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds, each one question for every variant")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each worker")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--code", nargs="*", default=[], metavar="DIR",
                        help="other checkouts whose engines run too (each as engine@DIR)")
    parser.add_argument("--results", type=Path, default=None,
                        help="where to append the records (default bench/results/single-<date>.jsonl)")
    smoke = parser.add_argument_group("smoke runs only (the benchmark is L=16, N=5, 64 tokens)")
    smoke.add_argument("--latent-steps", type=int, default=16)
    smoke.add_argument("--steps", type=int, default=5)
    smoke.add_argument("--max-tokens", type=int, default=64)
    inner = parser.add_argument_group("inside a worker process (set by the driver)")
    inner.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    inner.add_argument("--code-root", type=Path, default=BENCH.parent, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict] | None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return None
    if "naive" not in args.variants:
        raise SystemExit("the ratios are to the naive loop: keep naive among --variants")
    records = run(args)
    path = args.results or RESULTS / f"single-{datetime.date.today():%Y-%m-%d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    variants = [*args.variants, *(f"engine@{code}" for code in args.code)]
    print(f"relat, L={args.latent_steps}, N={args.steps}, rank 8, bridge, adapter on while answering, greedy, "
          f"{args.max_tokens} tokens (EOS ignored), {args.threads} threads per worker; {args.rounds} timed rounds, "
          f"the variants in alternating order.\n")
    print(table(records, variants))
    print(f"\nrecords appended to {path}")
    return records


if __name__ == "__main__":
    main()
