"""`relat ask`'s flags for OpenAI's sampling fields beyond temperature and top-p (penalties, logit_bias, logprobs),
and the table of token logprobs it prints when asked for them (with `--logprob-shift`, the base model's beside
them and the shift between the two).

The TTT options' flags, `--logprob-shift` among them, are generated from the server's settings
(settings.add_ttt_arguments); these sampling ones are written here, with the engine's ranges in their help.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from relat_core.params import LOGIT_BIAS, SAMPLING_BOUNDS


def _logit_bias(text: str) -> tuple[int, float]:
    """`ID=BIAS`, as --logit-bias takes it: a token id and the bias added to its logit."""
    token, separator, bias = text.partition("=")
    try:
        if not separator or not token.strip().isdigit():
            raise ValueError
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS (e.g. 198=-100), got {text!r}") from None


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    for name, what in (("presence_penalty", "lowers a token's logit once if the answer has it already"),
                       ("frequency_penalty", "lowers a token's logit per time the answer has it already")):
        parser.add_argument("--" + name.replace("_", "-"), type=float,
                            help=f"{what} (OpenAI's; {SAMPLING_BOUNDS[name].describe()})")
    parser.add_argument("--logit-bias", type=_logit_bias, action="append", metavar="ID=BIAS",
                        help=f"add BIAS ({LOGIT_BIAS.describe()}) to token ID's logit; repeat for more tokens")
    parser.add_argument("--logprobs", action="store_true",
                        help="print each answer token's logprob in a table (stderr, before the trace)")
    parser.add_argument("--top-logprobs", type=int, metavar="K",
                        help="also the K likeliest tokens at each position (0-20; turns --logprobs on)")


def sampling_fields_from_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling fields these flags set, as SamplingParams keyword arguments (and /v1/relat fields, but for
    logit_bias's keys, which JSON needs as strings: `wire`). --top-logprobs and --logprob-shift are about logprobs,
    so each turns --logprobs on: asking for them alone prints the table rather than a 400."""
    fields: dict[str, Any] = {}
    for name in ("presence_penalty", "frequency_penalty", "top_logprobs"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.logit_bias:
        fields["logit_bias"] = dict(args.logit_bias)
    if args.logprobs or args.top_logprobs or args.logprob_shift:
        fields["logprobs"] = True
    return fields


def wire(fields: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields as /v1/relat takes them: logit_bias's token ids as JSON's string keys."""
    if "logit_bias" in fields:
        return {**fields, "logit_bias": {str(token): bias for token, bias in fields["logit_bias"].items()}}
    return fields


def print_logprobs(content: list[dict], stream: TextIO | None = None) -> None:
    """A table of the answer's tokens (choices[].logprobs.content as the API returns them): position, token (as a
    JSON string, so that spaces and newlines show), logprob; with logprob_shift the base model's logprob on the
    plain prompt and the shift (logprob - base); with top_logprobs the likeliest tokens."""
    shifted = any(entry.get("relat_base_logprob") is not None for entry in content)
    width = min(max([len(json.dumps(entry["token"], ensure_ascii=False)) for entry in content] + [5]), 24)
    header = f"{'#':>4}  {'token':<{width}}  {'logprob':>9}"
    if shifted:
        header += f"  {'base':>9}  {'shift':>8}"
    lines = [f"logprobs of the answer's {len(content)} tokens"
             + (" (base: the base model's on the plain prompt; shift: logprob - base)" if shifted else "") + ":",
             header]
    for position, entry in enumerate(content):
        token = json.dumps(entry["token"], ensure_ascii=False)
        line = f"{position:>4}  {token:<{width}}  {entry['logprob']:>9.4f}"
        if shifted:
            base = entry.get("relat_base_logprob")
            line += f"  {base:>9.4f}  {entry['logprob'] - base:>+8.4f}" if base is not None else f"  {'-':>9}  {'-':>8}"
        if entry.get("top_logprobs"):
            line += "  top: " + ", ".join(f"{json.dumps(top['token'], ensure_ascii=False)} {top['logprob']:.3f}"
                                          for top in entry["top_logprobs"])
        lines.append(line)
    if shifted:
        shifts = [entry["logprob"] - entry["relat_base_logprob"] for entry in content
                  if entry.get("relat_base_logprob") is not None]
        if shifts:
            lines.append(f"mean shift {sum(shifts) / len(shifts):+.4f}  largest {max(shifts, key=abs):+.4f}")
    print("\n".join(lines), file=stream or sys.stderr)
