"""The `relat` command: `relat ask` runs one request (on a local engine, or against a server with --url)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from tqdm import tqdm

from relat_core.params import ALL_TARGETS, METHODS


def _add_request_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", help="the question to answer")
    parser.add_argument("--method", choices=METHODS, help="direct, latent (open loop) or relat (closed loop)")
    parser.add_argument("--steps", type=int, help="test-time training steps N")
    parser.add_argument("--latent-steps", type=int, help="latent thought length L")
    parser.add_argument("--lr", type=float, help="AdamW learning rate of the adapter")
    parser.add_argument("--rank", type=int, help="LoRA rank")
    parser.add_argument("--targets", help=f"comma-separated adapter targets among {','.join(ALL_TARGETS)}")
    parser.add_argument("--stop-loss", type=float, help="stop training once the reconstruction loss is this low")
    parser.add_argument("--follow-up", choices=("bridge", "restate"), help="what separates thought and answer")
    parser.add_argument("--adapter-during-answer", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the adapter on while decoding the answer")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON instead of streaming")


def ttt_overrides(args: argparse.Namespace) -> dict:
    """The request's `relat` options that the user set on the command line."""
    names = ("method", "steps", "latent_steps", "lr", "rank", "stop_loss", "follow_up", "adapter_during_answer")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.targets:
        overrides["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    return overrides


def _messages(args: argparse.Namespace) -> list[dict]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": args.question}]


def print_trace(trace: dict, usage: dict, stream=sys.stderr) -> None:
    """A compact, human-readable trace: losses per step and time per phase."""
    lines = [f"method={trace['method']} latent_steps={trace['latent_steps']} "
             f"adapter_during_answer={trace['adapter_during_answer']}"]
    for step in trace.get("steps", []):
        norm = "-" if step["grad_norm"] is None else f"{step['grad_norm']:.3f}"
        lines.append(f"  step {step['step']}: loss {step['loss']:.4f}  grad_norm {norm}  {step['seconds']:.2f}s")
    if trace.get("recon_loss_before") is not None:
        after = trace.get("recon_loss_after")
        lines.append(f"reconstruction loss {trace['recon_loss_before']:.4f} -> "
                     f"{'-' if after is None else format(after, '.4f')}"
                     f"{'  (stopped early)' if trace.get('stopped_early') else ''}")
    if trace.get("aborted"):
        lines.append(f"update abandoned: {trace['aborted']} (answered by the base model)")
    lines.append("timings: " + "  ".join(f"{k}={v:.2f}s" for k, v in trace.get("timings", {}).items()))
    lines.append(f"tokens: prompt {usage['prompt_tokens']}  completion {usage['completion_tokens']}")
    print("\n".join(lines), file=stream)


def ask_local(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from relat_core import Engine, Finished, Request, SamplingParams, TextDelta, TrainStep, load_model

    engine = Engine(load_model(args.model, device=args.device, dtype=args.dtype))
    ttt = engine.defaults.replace(**ttt_overrides(args))
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    progress = None
    for event in engine.generate(Request(_messages(args), ttt, sampling)):
        if isinstance(event, TrainStep):
            if progress is None:
                progress = tqdm(total=event.steps, desc="adapting", unit="step", file=sys.stderr, leave=False)
            progress.update(1)
            progress.set_postfix(loss=f"{event.loss:.3f}")
        elif isinstance(event, TextDelta):
            if progress is not None:
                progress.close()
                progress = None
            if not args.json:
                print(event.text, end="", flush=True)
        elif isinstance(event, Finished):
            if progress is not None:
                progress.close()
            result = event.result
            usage = {**asdict(result.usage), "total_tokens": result.usage.total_tokens}
            if args.json:
                print(json.dumps({"text": result.text, "finish_reason": result.finish_reason, "usage": usage,
                                  "trace": result.trace.to_dict()}, indent=2))
            else:
                print()
                print_trace(result.trace.to_dict(), usage)
    return 0


def prepare_model(args: argparse.Namespace) -> int:
    """Load (downloading or converting as needed) and cache a model, so that a later start needs nothing else."""
    from relat_core import load_model

    loaded = load_model(args.model, device="cpu", dtype="float32")  # a hub id lands in HF_HOME, a GGUF in our cache
    print(f"{loaded.name}: ready")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    ask = commands.add_parser("ask", help="answer one question and print the trace")
    _add_request_arguments(ask)
    ask.add_argument("--model", help="HF id, local folder or .gguf file (default: the embedded SmolLM2-135M)")
    ask.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    ask.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    ask.set_defaults(handler=ask_local)
    prepare = commands.add_parser("prepare", help="download or convert a model into the cache, then exit")
    prepare.add_argument("--model", help="HF id, local folder or .gguf file (default: the embedded SmolLM2-135M)")
    prepare.set_defaults(handler=prepare_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from relat_core import InvalidParameter, ModelLoadError

    try:
        return args.handler(args)
    except (InvalidParameter, ModelLoadError) as error:
        print(f"relat: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
