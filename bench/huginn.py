"""Huginn's depth knob: time per answer token and memory against num_steps, at a fixed depth and with adaptive exit.

The model is relat_core's own Huginn (relat_core/models/huginn/) with random weights: built from a HuginnConfig
of the chosen shape, then `reset_parameters` with a torch generator seeded --seed (the "takase" init). The default
shape, "small", is Huginn's layout at toy width (n_embd 512, 8 heads, MLP 1376, vocab 32000, 2 prelude + 4 core +
2 coda blocks, mean_recurrence 32), fp32 on CPU; `--shape huginn-0125` is the published 3.5B shape (HuginnConfig's
defaults), in bf16 unless --dtype, meant for a GPU (--device cuda).

For each setting, num_steps in --steps times exit criterion in --exits ("none": a fixed depth of num_steps; "kl",
"latent-diff", "argmax-stability" at the model's default thresholds, DEFAULT_EXIT_THRESHOLDS, never more than
num_steps), one greedy batch-1 request:
  - prefill: a prompt of --prompt-tokens random token ids (seeded) in one forward call into a fresh HuginnCache
    (model.new_cache()), with the same num_steps and exit as the decode; its argmax is the first answer token;
  - decode: --decode-tokens forward calls of one token each, the previous argmax fed back, every call timed alone
    (ms/token: median and mean over these calls; the prefill's token is not among them);
  - the initial latent state: --init-scale (default 1, the model's default: a random state) drawn from a torch
    generator seeded --seed on the device, so runs repeat; 0 gives zeros;
  - recurrences: output.recurrences of each decode call (mean/min/max over the decoded tokens), and the prefill's
    over the prompt positions;
  - KV cache: the bytes of every tensor the HuginnCache holds at the end (prelude, coda, core_steps, core_latest,
    depth), each distinct storage counted once;
  - memory: each setting runs in a fresh subprocess (this script with --one); its peak RSS (getrusage ru_maxrss) at
    the end minus its RSS right after the model was built, so the figure is what warm-up, prefill and decode added
    (on CUDA also the peak of torch's allocator above the model). Building peaks far above the built model, so the
    peak is reset to the RSS after the build where Linux allows it (/proc/self/clear_refs; the row says if not).
Before timing, one short warm-up request (8 prompt tokens, 2 decoded) with the same setting and its own cache.
All in torch.inference_mode() with --threads torch threads. With random weights an adaptive exit may fire at once or
never: the recurrences columns say which, nothing is tuned to make it fire.

The rows and the machine go to --out (JSON, default bench/results/huginn-depth-<date>.json), a Markdown table to
stdout.

    python bench/huginn.py                                   # 5 depths x 4 exits, "small" on CPU: 20 settings
    python bench/huginn.py --steps 4 --exits none,kl --decode-tokens 8        # one small real setting
    python bench/huginn.py --quick                           # tiny sizes, seconds (the test)
    python bench/huginn.py --shape huginn-0125 --device cuda # the published shape on a GPU, bf16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from relat_core.models.huginn import (
    DEFAULT_EXIT_THRESHOLDS,
    EXIT_CRITERIA,
    HuginnCache,
    HuginnConfig,
    HuginnForCausalLM,
)

BENCH = Path(__file__).resolve().parent

EXITS = ("none", *EXIT_CRITERIA)
# The shapes --shape names: HuginnConfig fields that differ from its defaults (the published huginn-0125).
SHAPES: dict[str, dict[str, Any]] = {
    "small": dict(n_embd=512, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1376, vocab_size=32000,
                  padded_vocab_size=None, block_size=4096, n_layers_in_prelude=2, n_layers_in_recurrent_block=4,
                  n_layers_in_coda=2, mean_recurrence=32, mean_backprop_depth=8),
    "huginn-0125": {},
}
# --quick: small enough that the test's settings take a few seconds each, most of it importing torch.
QUICK = dict(n_embd=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128, vocab_size=512)
QUICK_STEPS, QUICK_DECODE, QUICK_PROMPT = "2,4", 4, 16
WARMUP_PROMPT, WARMUP_DECODE = 8, 2
ROW_MARKER = "HUGINN-ROW "  # the child's result line on stdout, told apart from anything else printed there
MIB = 1 << 20


# -- one setting (in the child process) ---------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident memory now (Linux /proc; elsewhere the peak so far, the best getrusage offers)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Lower the peak RSS to the RSS now (Linux >= 4.0), so that the build's transient peak (about 300 MiB above the
    built model at the "small" shape, more than decoding adds) does not hide what decoding adds. False where the
    kernel does not allow it: the peak then includes the build."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def cache_bytes(cache: HuginnCache) -> tuple[int, int]:
    """(bytes, tensors) the cache holds: each distinct storage once, so that a view, or the same tensor kept in two
    lists (a first commit keeps the call's own tensors, and core_latest may be one of core_steps), counts once."""
    tensors: list[torch.Tensor] = []
    for pair in [*cache.prelude, *cache.coda, *cache.core_latest, *(p for steps in cache.core_steps for p in steps)]:
        if pair is not None:
            tensors.extend(pair)
    if cache.depth is not None:
        tensors.append(cache.depth)
    storages: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values()), len(storages)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(config: HuginnConfig, device: torch.device, dtype: torch.dtype, seed: int) -> HuginnForCausalLM:
    # Built on the device itself (the 3.5B shape is 14 GB in fp32), then re-initialised from a seeded generator so
    # that every subprocess has the same weights; the cast comes after, so fp32 and bf16 runs share their draws.
    with torch.device(device):
        model = HuginnForCausalLM(config)
    model.reset_parameters(torch.Generator(device).manual_seed(seed))
    model = model.to(dtype).eval()
    model.tie_weights()  # the head is the embedding: keep it one tensor whatever the cast did
    return model


def greedy(model: HuginnForCausalLM, prompt: torch.Tensor, decode_tokens: int, options: dict[str, Any],
           generator: torch.Generator) -> dict[str, Any]:
    """Prefill `prompt` (1, P), then decode_tokens single-token calls feeding the argmax back; times each call."""
    device = prompt.device
    cache = model.new_cache()
    synchronize(device)
    start = time.perf_counter()
    output = model(prompt, cache=cache, generator=generator, **options)
    token = output.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    prefill_recurrences = output.recurrences.flatten().tolist()
    seconds: list[float] = []
    recurrences: list[int] = []
    tokens = [int(token)]
    for _ in range(decode_tokens):
        start = time.perf_counter()
        output = model(token, cache=cache, generator=generator, **options)
        token = output.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))  # int() waits for the device, so the time includes the whole call
        seconds.append(time.perf_counter() - start)
        recurrences.append(int(output.recurrences[0, -1]))
    return {"prefill_s": prefill_s, "prefill_recurrences": prefill_recurrences, "seconds": seconds,
            "recurrences": recurrences, "tokens": tokens, "cache": cache}


def run_one(setting: dict[str, Any]) -> dict[str, Any]:
    """One setting, start to end, in this (fresh) process: the row of the report."""
    torch.set_num_threads(setting["threads"])
    device = torch.device(setting["device"])
    dtype = getattr(torch, setting["dtype"])
    config = HuginnConfig(**setting["config"])
    with torch.inference_mode():
        model = build_model(config, device, dtype, setting["seed"])
        synchronize(device)
        peak_during_build = peak_rss_bytes()
        peak_reset = reset_peak_rss()
        rss_after_build = rss_bytes()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            allocated_after_build = torch.cuda.memory_allocated(device)
        exit_criterion = None if setting["exit"] == "none" else setting["exit"]
        options = dict(num_steps=setting["num_steps"], init_scale=setting["init_scale"],
                       exit_criterion=exit_criterion, exit_threshold=None, return_logits=True)
        # Prompt ids and the initial states come from their own seeded generators: the same in every setting.
        prompt_generator = torch.Generator().manual_seed(setting["seed"])
        prompt = torch.randint(config.vocab_size, (1, setting["prompt_tokens"]), generator=prompt_generator)
        prompt = prompt.to(device)
        greedy(model, prompt[:, :WARMUP_PROMPT], WARMUP_DECODE, options,
               torch.Generator(device).manual_seed(setting["seed"]))
        run = greedy(model, prompt, setting["decode_tokens"], options,
                     torch.Generator(device).manual_seed(setting["seed"]))
        kv_bytes, kv_tensors = cache_bytes(run["cache"])
        cache_length = run["cache"].length
        del run["cache"]
    ms = [s * 1000 for s in run["seconds"]]
    row = {
        "num_steps": setting["num_steps"], "exit": setting["exit"],
        "exit_threshold": DEFAULT_EXIT_THRESHOLDS.get(setting["exit"]),
        "prefill_s": run["prefill_s"],
        "ms_per_token_median": statistics.median(ms), "ms_per_token_mean": statistics.mean(ms),
        "ms_per_token_min": min(ms), "ms_per_token_max": max(ms),
        "recurrences_mean": statistics.mean(run["recurrences"]), "recurrences_min": min(run["recurrences"]),
        "recurrences_max": max(run["recurrences"]),
        "prefill_recurrences_mean": statistics.mean(run["prefill_recurrences"]),
        "prefill_recurrences_min": min(run["prefill_recurrences"]),
        "prefill_recurrences_max": max(run["prefill_recurrences"]),
        "kv_cache_bytes": kv_bytes, "kv_cache_storages": kv_tensors, "cache_positions": cache_length,
        "rss_after_build_bytes": rss_after_build, "peak_rss_during_build_bytes": peak_during_build,
        "peak_rss_reset_after_build": peak_reset, "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_added_bytes": peak_rss_bytes() - rss_after_build,
        "ms_per_token": ms, "recurrences": run["recurrences"], "tokens": run["tokens"],
    }
    if device.type == "cuda":
        row["cuda_peak_added_bytes"] = torch.cuda.max_memory_allocated(device) - allocated_after_build
    return row


def run_in_subprocess(setting: dict[str, Any]) -> dict[str, Any]:
    """run_one in a fresh interpreter, so that its peak RSS is this setting's alone."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(setting)],
                          stdout=subprocess.PIPE, text=True, check=False)
    rows = [line[len(ROW_MARKER):] for line in done.stdout.splitlines() if line.startswith(ROW_MARKER)]
    if done.returncode != 0 or not rows:
        raise RuntimeError(f"setting {setting['num_steps']} steps, exit {setting['exit']} failed "
                           f"(exit status {done.returncode}); its stderr is above")
    return json.loads(rows[-1])


# -- the sweep ----------------------------------------------------------------------------------------------------


def machine(device: str, threads: int) -> dict[str, Any]:
    name = platform.processor() or platform.machine()
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        try:  # the CPU's model name, which platform.processor() leaves empty on Linux
            with open("/proc/cpuinfo") as cpuinfo:
                name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                            name)
        except OSError:
            pass
    return {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": threads, "device": device,
            "device_name": name}


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    fields = dict(SHAPES[args.shape])
    if args.quick:
        fields.update(QUICK)
    overrides = {"n_embd": args.n_embd, "num_attention_heads": args.heads, "num_key_value_heads": args.heads,
                 "intermediate_size": args.intermediate_size, "vocab_size": args.vocab_size,
                 "n_layers_in_prelude": args.prelude_layers, "n_layers_in_recurrent_block": args.core_layers,
                 "n_layers_in_coda": args.coda_layers}
    fields.update({name: value for name, value in overrides.items() if value is not None})
    return HuginnConfig(**fields).to_dict()  # checked here, before any subprocess starts


def markdown(rows: list[dict[str, Any]], cuda: bool) -> str:
    header = ["num_steps", "exit", "prefill s", "ms/token (median)", "recurrences mean/min/max", "KV cache MiB",
              "peak RSS added MiB"] + (["CUDA peak added MiB"] if cuda else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["num_steps"]), row["exit"], f"{row['prefill_s']:.3f}", f"{row['ms_per_token_median']:.1f}",
                 f"{row['recurrences_mean']:.1f} / {row['recurrences_min']} / {row['recurrences_max']}",
                 f"{row['kv_cache_bytes'] / MIB:.2f}", f"{row['peak_rss_added_bytes'] / MIB:.0f}"]
        if cuda:
            cells.append(f"{row['cuda_peak_added_bytes'] / MIB:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=None, help="num_steps values, comma-separated (default 4,8,16,32,64)")
    parser.add_argument("--exits", default=",".join(EXITS), help=f"comma-separated, of {', '.join(EXITS)}")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prompt length P (default 64)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="timed decode calls D (default 32)")
    parser.add_argument("--init-scale", type=float, default=1.0, help="the initial state's scale (0: zeros)")
    parser.add_argument("--seed", type=int, default=0, help="weights, prompt ids and initial states")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="small")
    parser.add_argument("--n-embd", type=int, default=None, help="override the shape's width")
    parser.add_argument("--heads", type=int, default=None, help="override its attention (and key-value) heads")
    parser.add_argument("--intermediate-size", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--prelude-layers", type=int, default=None)
    parser.add_argument("--core-layers", type=int, default=None)
    parser.add_argument("--coda-layers", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="auto: bfloat16 for huginn-0125, float32 for the others")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes for tests ({QUICK}), steps {QUICK_STEPS}, {QUICK_DECODE} decoded tokens, "
                             f"a {QUICK_PROMPT}-token prompt")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON report (default bench/results/huginn-depth-<date>.json)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child's setting, as JSON
    args = parser.parse_args(argv)
    args.steps = args.steps or (QUICK_STEPS if args.quick else "4,8,16,32,64")
    if args.prompt_tokens is None:
        args.prompt_tokens = QUICK_PROMPT if args.quick else 64
    if args.decode_tokens is None:
        args.decode_tokens = QUICK_DECODE if args.quick else 32
    if args.prompt_tokens < 1 or args.decode_tokens < 1:
        parser.error("--prompt-tokens and --decode-tokens must be at least 1")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.shape == "huginn-0125" else "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        print(ROW_MARKER + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0
    steps = [int(value) for value in args.steps.split(",")]
    exits = [value.strip() for value in args.exits.split(",")]
    unknown = sorted(set(exits) - set(EXITS))
    if unknown or min(steps) < 1:
        raise SystemExit(f"unknown exits {unknown}, or num_steps below 1 in {steps}")
    config = model_config(args)
    settings = {"shape": args.shape, "quick": args.quick, "config": config, "device": args.device,
                "dtype": args.dtype, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                "decode_tokens": args.decode_tokens, "init_scale": args.init_scale, "seed": args.seed,
                "warmup": {"prompt_tokens": WARMUP_PROMPT, "decode_tokens": WARMUP_DECODE},
                "exit_thresholds": DEFAULT_EXIT_THRESHOLDS, "steps": steps, "exits": exits}
    report = {"date": datetime.date.today().isoformat(), "machine": machine(args.device, args.threads),
              "settings": settings, "rows": []}
    started = time.perf_counter()
    for num_steps in steps:
        for exit_name in exits:
            child = {key: settings[key] for key in ("config", "device", "dtype", "threads", "prompt_tokens",
                                                    "decode_tokens", "init_scale", "seed")}
            row = run_in_subprocess({**child, "num_steps": num_steps, "exit": exit_name})
            report["rows"].append(row)
            print(f"{num_steps} steps, exit {exit_name}: {row['ms_per_token_median']:.1f} ms/token, recurrences "
                  f"{row['recurrences_mean']:.1f}, KV cache {row['kv_cache_bytes'] / MIB:.1f} MiB", flush=True)
    report["wall_s"] = time.perf_counter() - started
    print()
    print(markdown(report["rows"], torch.device(args.device).type == "cuda"))
    out = args.out or BENCH / "results" / f"huginn-depth-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nreport: {out} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
