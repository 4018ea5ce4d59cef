"""Each low-bit product against fp32, per shape and row count (issue 29's dispatch, relat_core/quantized.py).

What it measures and why: `--weights int8|int4` runs a product of few rows on relat's own kernels
(relat_core/kernels/lowbit.cpp) and one of many rows by dequantising the layer's weight and calling torch's fp32
product. Which is faster depends on the shape and the rows, so `KERNEL_MAX_ROWS` is read off this table: for the
forward and for the input gradient, the most rows up to which the kernel beats the dequantising path on every
shape of the model.

Each cell is the median milliseconds of one product (forward: x W^T; backward: dy W, the input gradient relat's
training needs), over as many distinct weights of that shape as the embedded model has (30 layers), taken in turn so
that they stream from memory as in a request rather than sit in the cache. fp32 is torch's product on a plain fp32
weight (what `--weights fp32` reads, packed or not); "kernel" the low-bit kernel; "deq" the dequantising path
(into a reused scratch matrix, as relat_core/quantized.py does).
Threads: --threads (1 by default, as bench/single.py's workers).

    python bench/lowbit.py [--rows 1 2 3 4 8 16 40] [--threads 1] [--out bench/results/quantized/lowbit-DATE.txt]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from relat_core import quantized  # noqa: E402

# (inputs, outputs, how many the embedded model has): SmolLM2-135M's 30 layers of q/o, k/v, gate/up and down.
SHAPES = ((576, 576, 60), (576, 192, 60), (576, 1536, 60), (1536, 576, 30))


def median_ms(run: Callable[[], object], count: int, repeats: int = 7) -> float:
    """Median over `repeats` of one call's milliseconds; `run` makes `count` products, one per distinct weight."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / count * 1e3


def products(lib, x: torch.Tensor, dy: torch.Tensor, weights: list, int8: list, int4: list) -> dict:
    """Each variant's (forward, backward) over every weight of the shape. The dequantising path writes into one
    scratch matrix, as QuantizedLinear does."""
    scratch = torch.empty(weights[0].shape)
    return {
        "fp32": (lambda: [x @ w.t() for w in weights], lambda: [dy @ w for w in weights]),
        "int8 kernel": (lambda: [lib.int8_forward(x, *q) for q in int8],
                        lambda: [lib.int8_backward(dy, *q) for q in int8]),
        "int8 deq": (lambda: [x @ lib.int8_dequantize(*q, scratch).t() for q in int8],
                     lambda: [dy @ lib.int8_dequantize(*q, scratch) for q in int8]),
        "int4 kernel": (lambda: [lib.int4_forward(x, *q) for q in int4],
                        lambda: [lib.int4_backward(dy, *q) for q in int4]),
        "int4 deq": (lambda: [x @ lib.int4_dequantize(*q, scratch).t() for q in int4],
                     lambda: [dy @ lib.int4_dequantize(*q, scratch) for q in int4]),
    }


def measure(inputs: int, outputs: int, count: int, rows: list[int]) -> list[dict]:
    lib = quantized.kernels()
    if lib is None:
        raise SystemExit("the low-bit kernels could not be built (a C++ compiler and ninja are needed)")
    weights = [torch.randn(outputs, inputs) * 0.02 for _ in range(count)]
    int8 = [quantized.quantize_int8(w) for w in weights]
    int4 = [quantized.quantize_int4(w) for w in weights]
    results = []
    for m in rows:
        x, dy = torch.randn(m, inputs), torch.randn(m, outputs)
        cells = products(lib, x, dy, weights, int8, int4)
        row = {"shape": f"{inputs}x{outputs}", "rows": m}
        for name, (forward, backward) in cells.items():
            row[name] = (median_ms(forward, count), median_ms(backward, count))
        results.append(row)
        print(format_row(row), flush=True)
    return results


def format_row(row: dict) -> str:
    cells = " | ".join(f"{row[key][0]:.3f} / {row[key][1]:.3f}" for key in row if key not in ("shape", "rows"))
    return f"| {row['shape']} | {row['rows']} | {cells} |"


def kernel_max_rows(results: list[dict], fmt: str, direction: int) -> int:
    """The most rows up to which the kernel beats the dequantising path on every shape, in one direction (0: the
    forward, 1: the input gradient), as `KERNEL_MAX_ROWS` is read."""
    best = 0
    for m in sorted({r["rows"] for r in results}):
        at_m = [r for r in results if r["rows"] == m]
        if all(r[f"{fmt} kernel"][direction] < r[f"{fmt} deq"][direction] for r in at_m):
            best = m
        else:
            break
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16, 40])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    header = [f"bench/lowbit.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
              f"{args.threads} thread(s), torch {torch.__version__}, CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}; ms per product, forward / backward (dy W)",
              "", "| shape (in x out) | rows | fp32 | int8 kernel | int8 deq | int4 kernel | int4 deq |",
              "|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    results = [row for inputs, outputs, count in SHAPES for row in measure(inputs, outputs, count, args.rows)]
    limits = {fmt: {"forward": kernel_max_rows(results, fmt, 0), "input_gradient": kernel_max_rows(results, fmt, 1)}
              for fmt in ("int8", "int4")}
    footer = [f"\nthe kernel faster than the dequantising path on every shape up to (rows): {limits}; "
              f"KERNEL_MAX_ROWS now: {quantized.KERNEL_MAX_ROWS}"]
    print(footer[0])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(header + [format_row(r) for r in results] + footer) + "\n")
    return results


if __name__ == "__main__":
    main()
