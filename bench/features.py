"""What each OpenAI feature costs per decoded token, against a plain decode, paired within rounds (issue 27).

What it measures and why: structured outputs mask each constrained row's logits with an xgrammar bitmask in the
decoding step; logprobs take a log-softmax and a top-k of each token's distribution; relat's logprob_shift adds one
plain row (the base model on the plain prompt) to the decoding batch. Each is a per-token cost, so the figure is
the decode phase's seconds over the tokens it decoded (the trace's `decode_s` over the completion tokens), not the
request's: prefill, the latent thought and training are left out.

How: one engine on one model, in this process. The machine is shared and its speed drifts within seconds
(bench/RESULTS.md, section 16), so each comparison is a pair of requests run back to back on the same question, in
an order that alternates by round: each ratio is the variant's figure over its baseline's from the same pair. A
round asks one question (knowledge_dev's, a new one per round) of every pair, the pairs in an order rotated by the
round. Every answer is greedy and forced to --max-tokens tokens (ignore_eos); the grammar variant's schema is an
object whose one string field must be longer than the token budget can write, so its answer cannot close early
either (the tokens each variant decoded are recorded, and the figures are per token decoded). Round 0 warms up
and is not kept.

Two figures per request: the trace's decode_s over the tokens decoded (ms/token: the decode phase as the trace
reports it), and the median of its engine steps that only decode (ms/step: the first step also prefills or
thinks, the last feeds nothing), which a burst of another process's work moves less.

Pairs (baseline, variant):
  - (plain, grammar): method direct, free; and direct with the answer constrained to that JSON schema;
  - (plain, logprobs): direct; and direct with logprobs and top_logprobs 5;
  - (plain, latent): direct; and method latent (L=4, the answer after the thought) with logprobs and top 5, which
    decodes no plain row (the baseline of the next pair; its own ratio is not a feature's cost);
  - (latent, logprob_shift): latent's request without, and with, relat.logprob_shift, which adds the plain row;
  - (batch-free, batch-half-grammar): a batch of --batch direct requests, all free; and the same batch with every
    other request constrained (the grammar mask's cost in a shared step). A batch's ms/token is its longest
    decode_s over the most tokens a row decoded.

    python bench/features.py [--rounds 8] [--threads 1] [--max-tokens 32] [--batch 8] [--out bench/results/features]
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
import time
import types
from pathlib import Path

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "results" / "features"
BATCHED = ("batch-free", "batch-half-grammar")
PAIRS = (("plain", "grammar"), ("plain", "logprobs"), ("plain", "latent"), ("latent", "logprob_shift"),
         ("batch-free", "batch-half-grammar"))
VARIANTS = ("plain", "grammar", "logprobs", "latent", "logprob_shift") + BATCHED  # the table's order
TOP_LOGPROBS = 5
LATENT_STEPS = 4


def long_answer_schema(max_tokens: int) -> dict:
    """An object with one string field longer than max_tokens tokens can write (SmolLM2's longest token is 81
    characters wide, its usual ones a few), so that the grammar cannot let the answer close before the budget."""
    length = 100 * max_tokens
    return {"type": "object", "properties": {"answer": {"type": "string", "minLength": length, "maxLength": length}},
            "required": ["answer"], "additionalProperties": False}


def requests_for(variant: str, question: str | list[str], max_tokens: int):
    """The request (or a batch's list of requests) a variant sends."""
    from relat_core import Request, SamplingParams, TTTParams
    from relat_core.params import StructuredOutput

    messages = [{"role": "user", "content": question}]
    direct = TTTParams(method="direct", answer_format="text")
    latent = TTTParams(method="latent", latent_steps=LATENT_STEPS, answer_format="text", gate="none")
    plain = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    logprobs = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=True,
                              top_logprobs=TOP_LOGPROBS)
    grammar = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                             structured_output=StructuredOutput.from_schema(long_answer_schema(max_tokens)))
    if variant in BATCHED:
        batch = []
        for number, text in enumerate(question):
            constrained = variant == "batch-half-grammar" and number % 2 == 0
            batch.append(Request([{"role": "user", "content": text}], direct, grammar if constrained else plain))
        return batch
    return {"plain": Request(messages, direct, plain),
            "grammar": Request(messages, direct, grammar),
            "logprobs": Request(messages, direct, logprobs),
            "latent": Request(messages, latent, logprobs),
            "logprob_shift": Request(messages, latent.replace(logprob_shift=True), logprobs)}[variant]


def run_batch(engine, requests: list) -> tuple[list, list[float]]:
    """Every request added at once (they prefill in one step and decode as one batch); their results, in order,
    and the seconds of each engine step."""
    from relat_core import Finished
    from relat_core.engine import Failed

    for number, request in enumerate(requests):
        engine.add_request(str(number), request)
    results: dict[int, object] = {}
    steps = []
    while engine.has_unfinished_requests:
        start = time.perf_counter()
        events = engine.step()
        steps.append(time.perf_counter() - start)
        for request_id, event in events:
            if isinstance(event, Finished):
                results[int(request_id)] = event.result
            elif isinstance(event, Failed):
                raise event.error
    return [results[number] for number in range(len(requests))], steps


def measure(engine, variant: str, question: str | list[str], max_tokens: int) -> dict:
    """One variant's decode phase: seconds, tokens decoded (per row), ms per token (decode_s over the tokens) and
    the median ms of the steps that only decode."""
    request = requests_for(variant, question, max_tokens)
    results, steps = run_batch(engine, request if isinstance(request, list) else [request])
    decode = [result.trace.timings["decode_s"] for result in results]
    tokens = [result.usage.completion_tokens for result in results]
    decoding = steps[1:-1] or steps  # the first step prefills (or thinks) too; the last feeds nothing
    record = {"decode_s": max(decode), "tokens": tokens, "ms_per_token": 1000 * max(decode) / max(tokens),
              "ms_per_step": 1000 * statistics.median(decoding), "steps": len(steps)}
    if variant in ("grammar", "batch-half-grammar"):  # the answer is JSON of the schema's shape, cut at the budget
        record["text_start"] = results[0].text[:40]
    if variant == "logprob_shift":  # the plain row's base logprobs came back: the variant did what it claims
        entries = results[0].choices[0].logprobs or []
        record["base_logprobs"] = sum(entry.base_logprob is not None for entry in entries)
    return record


def components(engine, max_tokens: int, batch: int, repeats: int = 200) -> dict[str, float]:
    """The per-step work each feature adds, timed alone on the engine's own code (median microseconds of
    `repeats` calls), where the paired requests' noise hides it: the grammar mask of one constrained row of one,
    and of half the rows of a batch (xgrammar's fill and apply, Grammars.mask), each matcher inside the schema's
    string; and one token's logprob with the top 5 (Answerer._logprob)."""
    import torch

    from relat_core import SamplingParams
    from relat_core.params import StructuredOutput

    output = StructuredOutput.from_schema(long_answer_schema(max_tokens))
    prompt = engine.tokenizer.encode("What is the capital of France?", add_special_tokens=False)
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([prompt])).logits[:, -1].float()
    logits = logits.repeat(batch, 1)

    def inside_string():
        grammar = engine.grammars.matcher(output)
        for token in engine.tokenizer.encode('{"answer": "The', add_special_tokens=False):
            grammar.accept(token)
        return grammar

    def median_us(call) -> float:
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return 1e6 * statistics.median(times)

    one = {0: inside_string()}
    half = {index: inside_string() for index in range(0, batch, 2)}
    row = types.SimpleNamespace(sampling=SamplingParams(logprobs=True, top_logprobs=TOP_LOGPROBS),
                                writes_agent_text=False)
    token = int(logits[0].argmax())
    return {"grammar_mask_one_row_us": median_us(lambda: engine.grammars.mask(logits[:1], one)),
            f"grammar_mask_{len(half)}_of_{batch}_rows_us": median_us(lambda: engine.grammars.mask(logits, half)),
            "logprob_top5_us": median_us(lambda: engine.answerer._logprob(row, logits[0], token))}


def quartiles(values: list[float]) -> dict[str, float]:
    """Median and the interquartile range's ends (the value itself when there is one)."""
    if len(values) < 2:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": low, "q3": high}


def summarise(records: list[dict]) -> dict[str, dict]:
    """Per variant: ms per token and per step (median, IQR) over all its requests, the tokens it decoded, and, for
    a pair's variant, its ratios to the baseline request of the same pair (per round; median, IQR)."""
    summary = {}
    for variant in VARIANTS:
        own = [r for r in records if r["variant"] == variant]
        if not own:
            continue
        entry = {"requests": len(own), "tokens": sorted({t for r in own for t in r["tokens"]}),
                 "ms_per_token": quartiles([r["ms_per_token"] for r in own]),
                 "ms_per_step": quartiles([r["ms_per_step"] for r in own])}
        pair = next((pair for pair in PAIRS if pair[1] == variant), None)
        if pair is not None:
            baseline = {r["round"]: r for r in records if r["pair"] == list(pair) and r["variant"] == pair[0]}
            paired = [(r, baseline[r["round"]]) for r in own if r["pair"] == list(pair) and r["round"] in baseline]
            entry["baseline"] = pair[0]
            for figure in ("ms_per_token", "ms_per_step"):
                ratios = [r[figure] / b[figure] for r, b in paired]
                entry[f"ratios_{figure}"] = ratios
                entry[f"ratio_{figure}"] = quartiles(ratios)
        summary[variant] = entry
    return summary


def table(summary: dict[str, dict]) -> str:
    def spread(figure: dict[str, float], digits: int) -> str:
        return f"{figure['median']:.{digits}f} ({figure['q1']:.{digits}f}–{figure['q3']:.{digits}f})"

    lines = ["| variant | requests | tokens decoded | ms/token, median (IQR) | ms/step, median (IQR) | paired with | "
             "ratio of ms/token, median (IQR) | ratio of ms/step, median (IQR) |", "|---|---|---|---|---|---|---|---|"]
    for variant, entry in summary.items():
        paired = "baseline" in entry
        lines.append(f"| {variant} | {entry['requests']} | {', '.join(str(t) for t in entry['tokens'])} | "
                     f"{spread(entry['ms_per_token'], 1)} | {spread(entry['ms_per_step'], 1)} | "
                     f"{entry.get('baseline', '–')} | "
                     f"{spread(entry['ratio_ms_per_token'], 3) if paired else '–'} | "
                     f"{spread(entry['ratio_ms_per_step'], 3) if paired else '–'} |")
    return "\n".join(lines)


def machine(threads: int) -> dict:
    model_name = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import torch

    return {"cpu": model_name or platform.processor(), "nproc": os.cpu_count(), "torch_threads": threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_start": list(os.getloadavg())}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds, after one warm-up round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="requests in the batched pair (half constrained)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for features.json and features.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, loaded=None) -> dict:
    """Run the bench (on `loaded`, a LoadedModel, or the embedded model) and write its report; returns it."""
    args = parse_args(argv)
    if str(BENCH) not in sys.path:  # loaded by path (the tests), not run as a script
        sys.path.insert(0, str(BENCH))
    import load  # bench/load.py, beside this file: the questions
    import torch

    torch.set_num_threads(args.threads)
    from relat_core import Engine, load_model

    if loaded is None:
        loaded = load_model()
        load.touch_weights(loaded.model)
    engine = Engine(loaded, num_slots=1)
    command = "python bench/features.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"machine": machine(args.threads), "model": loaded.name,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "settings": {"rounds": args.rounds, "max_tokens": args.max_tokens, "batch": args.batch,
                           "latent_steps": LATENT_STEPS, "top_logprobs": TOP_LOGPROBS,
                           "schema": long_answer_schema(args.max_tokens), "command": command.strip()}}
    pool = load.questions((args.rounds + 1) * args.batch)
    records = []
    start = time.perf_counter()
    for number in range(args.rounds + 1):
        shift = number % len(PAIRS)
        for pair in PAIRS[shift:] + PAIRS[:shift]:  # each pair takes each place in turn
            for variant in pair if number % 2 == 0 else pair[::-1]:
                batched = variant in BATCHED
                question = pool[number * args.batch:(number + 1) * args.batch] if batched else pool[number]
                record = {"round": number, "pair": list(pair), "variant": variant,
                          **measure(engine, variant, question, args.max_tokens)}
                print(json.dumps(record), file=sys.stderr, flush=True)
                if number:  # round 0 warms every variant up (the grammar compiled, the allocator grown)
                    records.append(record)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["seconds"] = time.perf_counter() - start
    report["records"] = records
    report["summary"] = summarise(records)
    report["components"] = components(engine, args.max_tokens, args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "features.json").write_text(json.dumps(report, indent=1) + "\n")
    settings = report["settings"]
    header = (f"Model {report['model']}; {report['machine']['cpu']}, {report['machine']['nproc']} cores, torch "
              f"threads {args.threads}; {settings['rounds']} rounds after a warm-up, greedy, {args.max_tokens} "
              f"tokens forced (ignore_eos), batch {args.batch}; {report['date']}; `{settings['command']}`.")
    parts = "\n".join(f"- {name}: {value:.1f}" for name, value in report["components"].items())
    text = f"{header}\n\n{table(report['summary'])}\n\nEach feature's work alone, median µs per call:\n\n{parts}\n"
    (args.out / "features.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
