"""The `relat` command: `relat serve` (the HTTP server), `relat ask` (one request, on a local engine or against a
server with --url), `relat eval` (variants side by side on benchmark files: relat_eval.cli) and `relat prepare`
(fetch or convert a model into the cache)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from io import BytesIO
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import uvicorn
from tqdm import tqdm

from relat_core.agents import AgentPrompts

from .ask_options import add_sampling_arguments, print_logprobs, sampling_fields_from_arguments, wire
from .settings import add_agent_prompts_argument, add_settings_arguments, add_ttt_arguments, ttt_fields_from_arguments


def _add_request_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", help="the question to answer")
    add_ttt_arguments(parser)  # the request's `relat` options, as `relat serve` has them
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    add_sampling_arguments(parser)  # penalties, logit_bias, logprobs
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON instead of streaming")
    parser.add_argument("--save-adapter", type=Path, metavar="DIR",
                        help="keep the trained adapter and write it to DIR in PEFT's format (adapter_config.json, "
                             "adapter_model.safetensors); method relat with steps >= 1")
    parser.add_argument("--cache-salt", metavar="SALT",
                        help="with --url: relat.cache_salt, only requests with the same salt share the server's "
                             "cached adapters within your tenant")


class NoAdapter(RuntimeError):
    """--save-adapter, and the request ended without an adapter (its update was abandoned)."""


def _saved(folder: Path, trace: dict) -> None:
    print(f"adapter saved to {folder} ({trace['adapter']['bytes']} bytes of weights)", file=sys.stderr)


def _no_adapter(trace: dict) -> NoAdapter:
    return NoAdapter(f"no adapter to save: {trace.get('aborted') or 'the request trained none'}")


def _messages(args: argparse.Namespace) -> list[dict]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": args.question}]


AGENT_TEXT_SHOWN = 80  # characters of a TextMAS agent's text on its progress line


def describe_turn(turn: dict) -> str:
    """An agent's turn in a few words: its kind, what it read, what it added, how long it took."""
    work = (f"{turn['latent_positions']} latent positions" if turn["kind"] == "latent"
            else f"{turn['completion_tokens']} tokens")
    return f"{turn['kind']}, {turn['prompt_tokens']} prompt tokens, {work}, {turn['seconds']:.2f}s"


def agent_line(turn: dict) -> str:
    """The progress line of an agent that finished; a TextMAS agent's text begins it, on one line."""
    line = f"[{turn['role']}] {describe_turn(turn)}"
    text = " ".join((turn.get("text") or "").split())
    if text:
        line += ": " + (text if len(text) <= AGENT_TEXT_SHOWN else text[:AGENT_TEXT_SHOWN - 3] + "...")
    return line


def print_trace(trace: dict, usage: dict, stream=None) -> None:
    """A compact, human-readable trace: losses per step, the agents' turns and time per phase (on stderr unless
    told)."""
    lines = [f"method={trace['method']} latent_steps={trace['latent_steps']} "
             f"adapter_during_answer={trace['adapter_during_answer']} answer_context={trace['answer_context']} "
             f"guidance={trace['guidance']:g} contrastive_eta={trace['contrastive_eta']:g} "
             # .get: a server older than the agents sends neither
             f"agents={trace.get('agents', 'single')} answer_format={trace.get('answer_format', 'text')}"]
    for step in trace.get("steps", []):
        norm = "-" if step["grad_norm"] is None else f"{step['grad_norm']:.3f}"
        lines.append(f"  step {step['step']}: loss {step['loss']:.4f}  grad_norm {norm}  {step['seconds']:.2f}s")
    for turn in trace.get("agent_turns", []):
        lines.append(f"  agent {turn['role']}: {describe_turn(turn)}")
    if trace.get("recon_loss_before") is not None:
        after = trace.get("recon_loss_after")
        # .get: a server older than the objectives trains on the reconstruction alone and does not say so
        lines.append(f"{trace.get('objective') or 'reconstruction'} loss {trace['recon_loss_before']:.4f} -> "
                     f"{'-' if after is None else format(after, '.4f')}"
                     f"{'  (stopped early)' if trace.get('stopped_early') else ''}")
    gate = trace.get("gate")  # .get: a server older than the gate sends none
    if gate:
        verdict = "kept direct's answer (no training)" if gate.get("gated") else "trained"
        lines.append(f"gate {gate['kind']}: {gate['signal']} {gate.get('value', float('nan')):.4f} against threshold "
                     f"{gate['threshold']:g}: {verdict}")
    if trace.get("signals"):
        lines.append("signals: " + "  ".join(f"{name}={value:.4f}" if isinstance(value, float) else
                                             f"{name}={value}" for name, value in trace["signals"].items()))
    if trace.get("aborted"):
        lines.append(f"update abandoned: {trace['aborted']} (answered by the base model)")
    if trace.get("cache") == "hit":
        lines.append("adapter cache: hit (no training ran; the steps above were recorded when it was trained)")
    elif trace.get("cache") == "miss":
        lines.append("adapter cache: miss (trained here, now cached)")
    depth = trace.get("recurrences")
    if depth:  # a recurrent-depth model (Huginn)
        options = trace.get("options", {})
        lines.append(f"recurrences per answer position: mean {depth['mean']:.1f}  min {depth['min']}  max "
                     f"{depth['max']}  (num_steps {options.get('num_steps')}, exit {options.get('exit_criterion')})")
    lines.append("timings: " + "  ".join(f"{k}={v:.2f}s" for k, v in trace.get("timings", {}).items()))
    lines.append(f"tokens: prompt {usage['prompt_tokens']}  completion {usage['completion_tokens']}")
    print("\n".join(lines), file=stream or sys.stderr)  # looked up now: tests and callers may replace it


def _show(events: Iterable[tuple[str, Any]], as_json: bool) -> None:
    """Print a request's progress, answer and trace; events are ("step", (step, steps, loss)), ("agent", turn),
    ("text", str) and ("done", {answer, finish_reason, usage, trace}), whether they come from a local engine or a
    server. Progress (steps, agents) goes to stderr, so that stdout holds the answer or the JSON alone."""
    progress = None
    for kind, value in events:
        if kind == "step":
            step, steps, loss = value
            if progress is None:
                # Created at the first finished step, so tqdm's rate would be meaningless: show steps and loss.
                progress = tqdm(total=steps, desc="adapting", file=sys.stderr, leave=False,
                                bar_format="{desc}: {n_fmt}/{total_fmt} steps |{bar:20}| {elapsed}{postfix}")
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}")
            continue
        if progress is not None:
            progress.close()
            progress = None
        if kind == "agent":
            print(agent_line(value), file=sys.stderr, flush=True)
        elif kind == "text" and not as_json:
            print(value, end="", flush=True)
        elif kind == "done":
            if as_json:
                print(json.dumps(value, indent=2))
            else:
                print()
                if value.get("logprobs"):
                    print_logprobs(value["logprobs"]["content"])
                print_trace(value["trace"], value["usage"])


def _local_events(args: argparse.Namespace, agent_prompts: AgentPrompts | None) -> Iterator[tuple[str, Any]]:
    from dataclasses import asdict

    from relat_core import AgentDone, Engine, Finished, Request, SamplingParams, TextDelta, TrainStep, load_model

    engine = Engine(load_model(args.model, device=args.device, dtype=args.dtype), agent_prompts=agent_prompts)
    ttt = engine.defaults.replace(**ttt_fields_from_arguments(args))
    from .logprobs import choice_logprobs

    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed, **sampling_fields_from_arguments(args))
    keep = args.save_adapter is not None
    for event in engine.generate(Request(_messages(args), ttt, sampling, return_adapter=keep)):
        if isinstance(event, TrainStep):
            yield "step", (event.step, event.steps, event.loss)
        elif isinstance(event, AgentDone):
            yield "agent", event.turn
        elif isinstance(event, TextDelta):
            yield "text", event.text
        elif isinstance(event, Finished):
            result = event.result
            usage = {**asdict(result.usage), "total_tokens": result.usage.total_tokens}
            if keep and result.adapter is not None:
                _saved(result.adapter.save(args.save_adapter), result.trace.to_dict())
            logprobs = choice_logprobs(result.choices[0].logprobs)  # the API's shape, as --url gets it
            yield "done", {"answer": result.text, "finish_reason": result.finish_reason, "usage": usage,
                           "trace": result.trace.to_dict(),
                           **({"logprobs": logprobs.model_dump()} if logprobs is not None else {})}
            if keep and result.adapter is None:
                raise _no_adapter(result.trace.to_dict())


def _remote_events(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    from dataclasses import asdict

    from relat_client import AgentTurn, Done, RelatClient, Token, TrainStep

    keep = args.save_adapter is not None
    options = {**ttt_fields_from_arguments(args), "max_tokens": args.max_tokens, "temperature": args.temperature,
               "top_p": args.top_p, "seed": args.seed, "system": args.system, "return_adapter": keep or None,
               "cache_salt": args.cache_salt,
               **wire(sampling_fields_from_arguments(args))}
    with RelatClient(args.url, api_key=args.api_key) as client:
        for event in client.stream(args.question, **options):
            if isinstance(event, TrainStep):
                yield "step", (event.step, event.steps, event.loss)
            elif isinstance(event, AgentTurn):
                yield "agent", asdict(event)
            elif isinstance(event, Token):
                yield "text", event.text
            elif isinstance(event, Done):
                trace = event.result["trace"]
                if keep and trace.get("adapter"):
                    _saved(_download_adapter(client, trace["adapter"]["url"], args.save_adapter), trace)
                shown = ("answer", "finish_reason", "usage", "trace", "logprobs")  # logprobs: when asked for
                yield "done", {key: event.result[key] for key in shown if key in event.result}
                if keep and not trace.get("adapter"):
                    raise _no_adapter(trace)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _download_adapter(client: Any, url: str, folder: Path) -> Path:
    """GET the server's zip of the adapter and write its two files (only those: the names come from the server)."""
    from relat_client import RelatError

    response = client.http.get(url)
    if response.status_code != 200:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        raise RelatError.from_body(response.status_code, body, response.headers)
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(BytesIO(response.content)) as archive:
        for name in ADAPTER_FILES:
            (folder / name).write_bytes(archive.read(name))
    return folder


def ask(args: argparse.Namespace) -> int:
    if args.url is None:
        try:  # before the model loads: a bad file is the user's to fix, in a line
            agent_prompts = AgentPrompts.load(args.agent_prompts) if args.agent_prompts else None
        except ValueError as error:
            print(f"relat: error: --agent-prompts: {error}", file=sys.stderr)
            return 2
        try:
            _show(_local_events(args, agent_prompts), args.json)
        except NoAdapter as error:
            print(f"relat: {error}", file=sys.stderr)
            return 1
        return 0
    if args.agent_prompts is not None:
        # A server's prompts are its own setting: ignoring the flag would answer with prompts the user did not ask for.
        print("relat: error: --agent-prompts sets the prompts of a local engine; a server uses its own "
              "(relat serve --agent-prompts)", file=sys.stderr)
        return 2
    from relat_client import RelatError

    try:
        _show(_remote_events(args), args.json)
    except RelatError as error:
        print(f"relat: server error {error.status}: {error.message}", file=sys.stderr)
        return 1
    except NoAdapter as error:
        print(f"relat: {error}", file=sys.stderr)
        return 1
    except httpx.HTTPError as error:
        print(f"relat: cannot reach {args.url}: {error}", file=sys.stderr)
        return 1
    return 0


def serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .app import create_app
    from .settings import settings_from_arguments

    try:
        settings = settings_from_arguments(args)
    except ValidationError as error:
        # Each problem without its input values: the input may hold API keys.
        for problem in error.errors():
            where = ".".join(str(part) for part in problem["loc"])
            print(f"relat serve: {where + ': ' if where else ''}{problem['msg']}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    app = create_app(settings)
    service = app.state.service
    server = DrainingServer(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                           timeout_graceful_shutdown=GRACEFUL_SECONDS), service)
    server.run()
    return 1 if service.phase == "failed" else 0


GRACEFUL_SECONDS = 5  # after the drain: long enough for the last chunks of finished streams to go out


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain: the first SIGTERM/SIGINT turns /ready to 503 and refuses new requests while those
    in flight finish (up to the drain timeout), then stops; a second signal is uvicorn's own (stop now)."""

    def __init__(self, config: uvicorn.Config, service: Any):
        super().__init__(config)
        self.service = service
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        service.on_fatal = self.stop

    def stop(self) -> None:
        self.should_exit = True

    async def startup(self, sockets: list | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self.loop is None:
            super().handle_exit(sig, frame)
            return
        self.draining = True  # not recorded as a captured signal: a completed drain exits with status 0
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain()))

    async def _drain(self) -> None:
        await self.service.drain()
        self.stop()


def prepare_model(args: argparse.Namespace) -> int:
    """Load (downloading or converting as needed) and cache a model, so that a later start needs nothing else."""
    from relat_core import load_model

    # A hub id lands in HF_HOME, a GGUF in our cache; with --weights auto's choice, relat's low-bit kernels are built
    # now too where the model would use them (torch's extension cache), so that a first `relat serve` compiles nothing.
    loaded = load_model(args.model, device="cpu", dtype="float32", weights="auto")
    print(f"{loaded.name}: ready (weights {loaded.weights})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve the OpenAI-compatible API (flags or RELAT_* variables)")
    add_settings_arguments(serve_parser)
    serve_parser.set_defaults(handler=serve)
    ask_parser = commands.add_parser("ask", help="answer one question and print the trace")
    _add_request_arguments(ask_parser)
    ask_parser.add_argument("--url", help="ask a running server (http://127.0.0.1:8000) instead of loading a model")
    ask_parser.add_argument("--api-key", default=os.environ.get("RELAT_API_KEY"),
                            help="API key for --url [RELAT_API_KEY]")
    ask_parser.add_argument("--model", help="HF id, local folder or .gguf file (default: the embedded SmolLM2-135M)")
    ask_parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    ask_parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    add_agent_prompts_argument(ask_parser)  # the local engine's; with --url, the server's setting applies
    ask_parser.set_defaults(handler=ask)
    from relat_eval import cli as eval_cli

    eval_parser = commands.add_parser("eval", help="score variants side by side on JSONL benchmarks, with a report",
                                      description=eval_cli.__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    eval_cli.add_arguments(eval_parser)
    eval_parser.set_defaults(handler=eval_cli.main)
    prepare = commands.add_parser("prepare", help="download or convert a model into the cache, then exit")
    prepare.add_argument("--model", help="HF id, local folder or .gguf file (default: the embedded SmolLM2-135M)")
    prepare.set_defaults(handler=prepare_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request would break `ask --url` output
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
