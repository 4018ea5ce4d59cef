"""Variants: what `relat eval --variants` compares, each a name and request options.

    --variants direct,latent,relat,relat-l16=relat:latent_steps=16:steps=5,textmas=direct:agents=sequential

A variant is `[NAME=]METHOD[:key=value]...`: the method, then any request option, so that a sweep is one command.
Keys are the fields of TTTParams (relat_core/params.py: steps, lr, latent_steps, guidance, agents, ...) and the
sampling fields max_tokens, temperature, top_p, top_k and seed. Values are read by the field's type: integers,
floats, true/false, `none` for optional fields, `targets` as `q_proj+v_proj`. Without a name, the spec is its
own name. Unset options are the engine's (or the server's) defaults, which the report lists in full.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields
from typing import Any

from relat_core import SamplingParams, TTTParams

# Sampling fields a variant may set; stop and ignore_eos would change what is scored, not how the model answers.
SAMPLING_KEYS: tuple[str, ...] = ("max_tokens", "temperature", "top_p", "top_k", "seed")


@dataclass(frozen=True)
class Variant:
    name: str
    options: dict[str, Any]  # method first, then the options as given

    @property
    def ttt(self) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k not in SAMPLING_KEYS}

    @property
    def sampling(self) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k in SAMPLING_KEYS}


def _hints() -> dict[str, Any]:
    ttt = typing.get_type_hints(TTTParams)
    sampling = typing.get_type_hints(SamplingParams)
    return {**{f.name: ttt[f.name] for f in fields(TTTParams)}, **{k: sampling[k] for k in SAMPLING_KEYS}}


def _coerce(key: str, raw: str, hint: object) -> object:
    """Parse one value by the field's type hint."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null"):
            if type(None) in args:
                return None
            raise ValueError(f"{key} cannot be none")
        return _coerce(key, raw, next(a for a in args if a is not type(None)))
    if hint is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key} wants true or false, got {raw!r}")
    try:
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
    except ValueError:
        raise ValueError(f"{key} wants a number, got {raw!r}") from None
    if typing.get_origin(hint) is tuple:
        return tuple(part for part in raw.split("+") if part)
    return raw  # str and Literal: TTTParams validates the value


def parse_variant(spec: str) -> Variant:
    """`[NAME=]METHOD[:key=value]...` into a Variant; ValueError names what is wrong."""
    spec = spec.strip()
    head, *pairs = spec.split(":")
    name, sep, method = head.partition("=")
    if not sep:
        name, method = spec, head
    name, method = name.strip(), method.strip()
    if not name or not method:
        raise ValueError(f"variant {spec!r}: want [NAME=]METHOD[:key=value]...")
    hints = _hints()
    options: dict[str, Any] = {"method": method}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or key not in hints or key == "method":
            raise ValueError(f"variant {name}: {pair!r} is not key=value with key one of "
                             f"{', '.join(sorted(set(hints) - {'method'}))}")
        options[key] = _coerce(key, raw.strip(), hints[key])
    check_options(name, options)
    return Variant(name, options)


def check_options(name: str, options: dict[str, Any]) -> None:
    """Build the parameters once, so that a bad value stops the run before any model time."""
    variant = Variant(name, options)
    try:
        TTTParams().replace(**variant.ttt)
        SamplingParams(**variant.sampling)
    except (ValueError, TypeError) as error:
        raise ValueError(f"variant {name}: {error}") from None


def parse_variants(texts: list[str]) -> list[Variant]:
    """Every --variants value, split at commas, in order; names must be unique."""
    variants = [parse_variant(spec) for text in texts for spec in text.split(",") if spec.strip()]
    names = [v.name for v in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"variant names must be unique: {', '.join(repeated)}")
    if not variants:
        raise ValueError("no variants: give --variants direct,latent,relat (for example)")
    return variants
