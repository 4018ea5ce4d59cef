"""The arithmetic floor of a ReLAT request: how fast this machine could serve it at best, from first principles.

What it measures and why: issue 4 asks how far the measured throughput is from the machine's floor. A request
is bounded below twice: by its floating-point work at the measured matmul peak (compute floor), and by the bytes
of weights it must stream from memory at the measured bandwidth (bandwidth floor). The latent steps and decoded
tokens are single-token passes, each of which reads every weight once, so one request alone is bandwidth-bound;
C requests batched into the same passes share those reads and add only compute, so batching lowers the floor per
request until compute takes over (at about C = bandwidth floor / compute floor).

How, FLOPs (Llama-shaped models; counts from the config and the request's real token counts):
  - a token through the decoder stack costs 2 FLOPs per linear weight (q/k/v/o, gate/up/down) plus its LoRA
    (2·r·(in+out) per adapted layer), plus attention 4·heads·head_dim per key it attends to, per layer (scores
    and weighted sum; keys the reconstruction hides are counted: dense kernels compute them);
  - the LM head (2·d·V per token) runs only where a token is needed: the reconstruction's scored positions and
    the answer's tokens (none in latent steps or prompts: what an implementation must do, not what it does);
  - training step (N of them): forward over prompt P + latents L + reconstruction R tokens; backward with the base
    weights frozen = 1x the forward's linear FLOPs (input gradients only, no base weight gradients) + the LoRA
    weight gradients (= their forward FLOPs again) + 2x the attention FLOPs (dQ, dK, dV, dP) + the LM head's
    input gradient at the scored positions. Norms, activations, RoPE, softmax and the optimiser are left out
    (element-wise, < 1 % here);
  - answer: prefill P and L latents again (adapted weights), the follow-up F, A-1 decoded tokens fed back, the LM
    head for A tokens.
Bytes: every forward pass (a prompt, one latent step, a reconstruction, one decoded token) reads every linear
weight once (fp32 here, in the model's dtype), and its backward pass reads them again for the input gradients;
the LM head's weight is read where the head runs. Activations, the KV cache and the adapter are left out (small
next to the weights at these lengths), so the floor is a lower bound. Per request:
    N·2·(L+2) + (L + 2 + A-1) stack reads  and  N·2 + A head reads.
The machine: the fp32 matmul peak is the best of a few square matmuls (--size, default 2048) at 1 and 2 threads;
the bandwidth is the best of (a) a batch-1 matvec over every linear weight of the model, the very access pattern of
a latent step, and (b) a sum over a 512 MiB tensor (a plain streaming read).

    python bench/floor.py [--threads 1 2] [--concurrency 1 4 8 16] [--latent-steps 16] [--steps 5] [--answer 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data" / "knowledge_dev.jsonl"
LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Tokens:
    """Token counts of one request (averages over the questions are fine: the costs are linear in them)."""

    prompt: float  # P
    recon: float  # R, instruction + question
    scored: float  # reconstruction positions with a label (the LM head runs there)
    follow: float  # F
    latent: int  # L
    steps: int  # N
    answer: int  # A


def tokens_of(tokenizer, questions: list[str], latent_steps: int, steps: int, answer: int) -> Tokens:
    """The engine's own segments (relat_core.chat), averaged over the questions."""
    from relat_core.chat import ChatFormat
    from relat_core.params import RECONSTRUCTION_INSTRUCTION

    chat = ChatFormat(tokenizer)
    segs = [chat.segments([{"role": "user", "content": q}], RECONSTRUCTION_INSTRUCTION, "bridge", latent=True)
            for q in questions]
    return Tokens(statistics.mean([len(s.prompt_ids) for s in segs]),
                  statistics.mean([len(s.recon_ids) for s in segs]),
                  statistics.mean([sum(label != -100 for label in s.recon_labels) for s in segs]),
                  statistics.mean([len(s.follow_ids) for s in segs]), latent_steps, steps, answer)


def shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer kind of one decoder block."""
    d, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, inter),
            "up_proj": (d, inter), "down_proj": (inter, d)}


def request_flops(config, t: Tokens, rank: int = 8, targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj",
                                                                                 "o_proj")) -> dict[str, float]:
    """FLOPs of one request by phase: train_forward, train_backward, answer, and total (see the module doc)."""
    layers, d, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    kinds = shapes(config)
    linear = 2 * layers * sum(i * o for i, o in kinds.values())  # per token
    lora = 2 * layers * sum(rank * (i + o) for kind, (i, o) in kinds.items() if kind in targets)
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    attention_per_key = 4 * layers * config.num_attention_heads * head_dim
    head = 2 * d * vocab

    def keys(start: float, count: float) -> float:
        """Keys attended to by `count` queries at context lengths start+1 .. start+count (causal)."""
        return count * start + count * (count + 1) / 2

    P, L, R, F, A = t.prompt, t.latent, t.recon, t.follow, t.answer
    train_tokens = P + L + R
    train_keys = keys(0, P) + keys(P, L) + keys(P + L, R)
    forward = train_tokens * (linear + lora) + attention_per_key * train_keys + t.scored * head
    backward = train_tokens * (linear + 2 * lora) + 2 * attention_per_key * train_keys + t.scored * head
    answer_tokens = P + L + F + A - 1
    answer_keys = keys(0, P) + keys(P, L) + keys(P + L, F) + keys(P + L + F, A - 1)
    answer = answer_tokens * (linear + lora) + attention_per_key * answer_keys + A * head
    result = {"train_forward": t.steps * forward, "train_backward": t.steps * backward, "answer": answer}
    result["total"] = sum(result.values())
    return result


# Bytes a decoder-stack weight costs in each `--weights` format (relat_core/quantized.py), its scales included:
# int8 one byte plus a 4-byte scale per output row (per weight: 4 / inputs); int4 half a byte plus a scale and a zero
# (8 bytes) per group of 32. The LM head stays fp32 in every format.
def stack_bytes_per_weight(fmt: str, inputs: int) -> float:
    return {"fp32": 4.0, "int8": 1 + 4 / inputs, "int4": 0.5 + 8 / 32}[fmt]


def request_bytes(config, t: Tokens, bytes_per_weight: int = 4, weights: str = "fp32") -> dict[str, float]:
    """Weight bytes one request reads alone (see the module doc); C requests in lockstep read the same. `weights`:
    the decoder stack's format (the LM head stays at `bytes_per_weight`)."""
    layers, d, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    stack = layers * sum(i * o * (bytes_per_weight if weights == "fp32" else stack_bytes_per_weight(weights, i))
                         for i, o in shapes(config).values())
    head = d * vocab * bytes_per_weight
    stack_reads = t.steps * 2 * (t.latent + 2) + (t.latent + 2 + t.answer - 1)
    head_reads = t.steps * 2 + t.answer
    return {"stack_bytes": stack, "head_bytes": head, "stack_reads": stack_reads, "head_reads": head_reads,
            "total": stack_reads * stack + head_reads * head}


# -- the machine ------------------------------------------------------------------------------------------------

def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(threads: int, size: int = 2048, repeats: int = 3) -> float:
    """fp32 FLOP/s of the best of `repeats` square matmuls at `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        out = torch.empty(size, size)
        return 2 * size**3 / _best_seconds(lambda: torch.mm(a, b, out=out), repeats)
    finally:
        torch.set_num_threads(previous)


def bandwidth(model: torch.nn.Module | None, threads: int, repeats: int = 3) -> dict[str, float]:
    """Bytes/s of (a) a batch-1 matvec over every linear weight of `model` and (b) a sum over 512 MiB."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = {}
        with torch.no_grad():
            if model is not None:
                weights = [m.weight for name, m in model.named_modules()
                           if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR_KINDS]
                inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
                total = sum(w.numel() * w.element_size() for w in weights)

                def matvecs() -> None:
                    for w in weights:
                        torch.nn.functional.linear(inputs[w.shape[1]], w)

                result["matvec"] = total / _best_seconds(matvecs, repeats)
            data = torch.ones(2**27)  # 512 MiB of fp32
            result["read"] = data.numel() * 4 / _best_seconds(data.sum, repeats)
        return result
    finally:
        torch.set_num_threads(previous)


def measure(model: torch.nn.Module | None, threads: list[int], size: int = 2048) -> dict[int, dict[str, float]]:
    """Per thread count: matmul peak (FLOP/s) and bandwidth (bytes/s: matvec, read, and the best of them)."""
    result = {}
    for n in threads:
        bw = bandwidth(model, n)
        result[n] = {"peak": matmul_peak(n, size), **bw, "bandwidth": max(bw.values())}
    return result


def floors(flops: float, weight_bytes: float, machine: dict[str, float], concurrency: int) -> dict[str, float]:
    """Seconds for `concurrency` requests run as one batch in lockstep, at best: compute, bandwidth, the floor
    (the larger), and the requests/s it allows."""
    compute = concurrency * flops / machine["peak"]
    memory = weight_bytes / machine["bandwidth"]
    floor = max(compute, memory)
    return {"compute_s": compute, "bandwidth_s": memory, "floor_s": floor, "requests_per_s": concurrency / floor}


def report(config, t: Tokens, machine: dict[int, dict[str, float]], concurrency: list[int], weights: str = "fp32"
           ) -> str:
    """The floor as markdown: the request's work, the machine, and the floor per thread count and concurrency."""
    flops, reads = request_flops(config, t), request_bytes(config, t, weights=weights)
    lines = [f"Floor of one request: P={t.prompt:.1f} prompt, L={t.latent} latent, R={t.recon:.1f} reconstruction "
             f"({t.scored:.1f} scored), F={t.follow:.1f} follow-up, A={t.answer} answer tokens, N={t.steps} steps. "
             f"FLOPs: train forward {flops['train_forward'] / 1e9:.1f} G, train backward (base frozen: input "
             f"gradients + LoRA gradients) {flops['train_backward'] / 1e9:.1f} G, answer {flops['answer'] / 1e9:.1f} "
             f"G, total {flops['total'] / 1e9:.1f} GFLOP. Weights read: {reads['stack_reads']:.0f} x "
             f"{reads['stack_bytes'] / 1e6:.0f} MB (decoder stack) + {reads['head_reads']:.0f} x "
             f"{reads['head_bytes'] / 1e6:.0f} MB (LM head) = {reads['total'] / 1e9:.1f} GB (stack in {weights}).",
             ""]
    lines += ["| threads | matmul peak GFLOP/s | bandwidth GB/s (matvec / read) | C | compute floor s | "
              "bandwidth floor s | floor requests/s |", "|---|---|---|---|---|---|---|"]
    for n, m in machine.items():
        for c in concurrency:
            f = floors(flops["total"], reads["total"], m, c)
            lines.append(f"| {n} | {m['peak'] / 1e9:.0f} | {m.get('matvec', 0) / 1e9:.1f} / {m['read'] / 1e9:.1f} | "
                         f"{c} | {f['compute_s']:.2f} | {f['bandwidth_s']:.2f} | {f['requests_per_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--latent-steps", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--answer", type=int, default=64, help="answer tokens A")
    parser.add_argument("--questions", type=int, default=16, help="average token counts over the first K questions")
    parser.add_argument("--size", type=int, default=2048, help="side of the square matmul")
    parser.add_argument("--weights", nargs="+", choices=("fp32", "int8", "int4"), default=["fp32"],
                        help="the decoder stack's format(s) (relat serve --weights): one floor per format, one "
                             "machine measurement (on the fp32 model's matvecs)")
    args = parser.parse_args()
    from relat_core import load_model

    loaded = load_model()
    questions = [json.loads(line)["question"] for line in DATA.open()][:args.questions]
    t = tokens_of(loaded.tokenizer, questions, args.latent_steps, args.steps, args.answer)
    machine = measure(loaded.model, args.threads, args.size)
    for weights in args.weights:
        print(report(loaded.model.config, t, machine, args.concurrency, weights))


if __name__ == "__main__":
    main()
