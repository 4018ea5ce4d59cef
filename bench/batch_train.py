"""Test-time training of K requests one after another versus as one batch (`Engine.adapt`), embedded model.

What it measures and why: a single-token step of this model reads all of its weights (memory-bound), so training
several requests' adapters in one batched forward and backward should cost little more than one. This is the
training phase only (no answer decoding, no server): the first measurement toward the batched engine of issue 4.
The questions are the first K of ../shared/data/knowledge_dev.jsonl; seconds are wall-clock, median of --repeats.

    python bench/batch_train.py [--threads 1] [--sizes 1 4 8] [--repeats 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from relat_core import Engine, Request, SamplingParams, TTTParams, load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "knowledge_dev.jsonl"
SETTINGS = {"defaults (L=4, N=2)": {}, "paper (L=16, N=5)": {"latent_steps": 16, "steps": 5}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    questions = [json.loads(line)["question"] for line in DATA.open()][:max(args.sizes)]
    engine = Engine(load_model(), num_slots=max(args.sizes))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"CPU: {cpu} · cores: {os.cpu_count()} · torch threads: {args.threads} · torch {torch.__version__} · "
          f"load average {os.getloadavg()[0]:.2f} · {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n")
    print("| setting | K requests | one after another s | one batch s | speed-up |")
    print("|---|---|---|---|---|")
    for name, changes in SETTINGS.items():
        ttt = TTTParams(**changes)
        requests = [Request([{"role": "user", "content": q}], ttt, SamplingParams(seed=i))
                    for i, q in enumerate(questions)]
        engine.adapt(requests[:1])  # warm-up
        for size in args.sizes:
            alone, together = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for request in requests[:size]:
                    engine.adapt([request])
                alone.append(time.perf_counter() - start)
                start = time.perf_counter()
                engine.adapt(requests[:size])
                together.append(time.perf_counter() - start)
            one, batch = statistics.median(alone), statistics.median(together)
            print(f"| {name} | {size} | {one:.1f} | {batch:.1f} | {one / batch:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
