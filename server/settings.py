"""Server settings: one pydantic-settings class feeds the environment (`RELAT_*`) and the `relat serve` flags.

Precedence, highest first: a command-line flag, an environment variable, the default below. The TTT and sampling
fields left at None fall back to the engine's default for the loaded model (TTT) or to OpenAI's (sampling).
The TTT fields (`TTTOptions`, server/ttt_options.py) are also the request's `relat` options and the `relat ask`
flags; the numeric fields' types (`bounded`, server/bounded_fields.py) are the engine's ranges. Both are re-exported
here.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from relat_core.agents import AgentPrompts
from relat_core.params import TTT_BOUNDS, InvalidParameter, TTTParams

# Re-exported: the field types and the TTT options were declared here before they had modules of their own.
from .bounded_fields import BOUNDS, JSONInteger, bounded, invalid  # noqa: F401
from .tenants import TenantDirectory
from .ttt_options import TTT_FIELDS, TTTOptions

SAMPLING_FIELDS: tuple[str, ...] = ("temperature", "top_p", "top_k")


def _split_commas(value: Any) -> Any:
    """`a,b` in an environment variable; a list from repeated flags or from Python."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# The TTT fields whose cost grows with their value, and the setting that is this server's maximum of each.
LIMITS: dict[str, str] = {"steps": "max_steps", "latent_steps": "max_latent_steps", "rank": "max_rank",
                          "agent_max_tokens": "max_agent_tokens", "num_steps": "max_num_steps"}


class Settings(BaseSettings, TTTOptions):
    model_config = SettingsConfigDict(env_prefix="RELAT_", extra="ignore")

    # -- model ------------------------------------------------------------------------------------------------
    model: str | None = Field(None, description="HF id, local folder or .gguf file (default: the embedded model)")
    served_model_name: str | None = Field(None, description="the `model` name clients use (default: derived)")
    device: str | None = Field(None, description="cpu, cuda, cuda:1, ... (default: cuda if present)")
    dtype: str | None = Field(None, description="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    pack_weights: bool = Field(
        True, description="fp32 on CPU: run the linear layers on oneDNN-packed copies of their weights (faster; one "
                          "more copy of them in memory)")
    weights: Literal["auto", "fp32", "int8", "int4"] = Field(
        "auto", description="CPU: store the frozen linear layers (not the LM head) in int8 (per-channel scales) or "
                            "int4 (groups of 32), forward and backward; fp32 keeps them as loaded; auto stores int4 "
                            "where it holds them exactly (a 4-bit checkpoint such as the embedded model) and relat's "
                            "kernels are built, else fp32")
    max_rank: bounded("rank") = Field(16, description="largest LoRA rank a request may ask for (sizes every slot)")
    max_model_len: int | None = Field(
        None, ge=1, description="context length in tokens, prompt plus answer (default and at most: the model's)")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: torch's choice)")
    agent_prompts: Path | None = Field(
        None, description="a JSON file of agent role prompts and answer-format instructions (default: built in)")
    adapter_cache_entries: int = Field(
        64, ge=0, description="trained adapters kept for requests that repeat a training (0: no adapter cache)")
    adapter_cache_bytes: int = Field(
        256 << 20, ge=0, description="bytes the adapter cache may hold, on the model's device (0: no cache)")

    # -- HTTP -------------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="accepted API keys (comma-separated in RELAT_API_KEYS), the tenant "
                                          "'default'; none and no keys_file: no auth")
    keys_file: Path | None = Field(
        None, description="a JSON file of tenants, each with the SHA-256 digest of its key and its limits "
                          "(docs/api.md, Tenants); with api_keys too, 'default' is theirs")
    access_log: str | None = Field(
        None, description="a JSON-lines access log, one line per request (tenant, route, status, tokens, seconds, "
                          "cache): a file to append to, or - for stderr (default: none)")
    log_prompts: bool = Field(
        False, description="the access log holds each request's prompt and answer too (default: never)")
    metrics_need_key: bool = Field(False, description="/metrics needs an API key too (default: open, as in vLLM)")
    log_level: str = Field("info", description="debug, info, warning or error")

    # -- limits and lifecycle ---------------------------------------------------------------------------------
    max_concurrency: int = Field(8, ge=1, description="requests batched together in the engine (one adapter slot each)")
    max_queue: int = Field(16, ge=0, description="requests waiting beyond those; more are answered 429")
    tenant_reserve: int | None = Field(
        None, ge=0, description="places of max_concurrency a tenant that runs a request may not take, kept for a "
                                "tenant that runs none (default: 1 with several tenants and max_concurrency >= 2, "
                                "else 0; one tenant: always 0)")
    batch_window: float = Field(0.02, ge=0, le=1, description="seconds an idle engine waits for a burst to batch")
    request_timeout: float = Field(600.0, gt=0, description="deadline of a request in seconds, queueing included")
    max_prompt_tokens: int = Field(2048, ge=1, description="longest prompt accepted, in tokens (else 413)")
    max_body_bytes: int = Field(1 << 20, ge=1, description="largest request body accepted, in bytes (else 413)")
    drain_timeout: float = Field(30.0, ge=0, description="seconds SIGTERM waits for in-flight requests")
    max_steps: bounded("steps") = Field(
        TTT_BOUNDS["steps"].high, description="most training steps a request may ask for (else 400)")
    max_latent_steps: bounded("latent_steps") = Field(
        TTT_BOUNDS["latent_steps"].high, description="longest latent thought a request may ask for (else 400)")
    max_agent_tokens: bounded("agent_max_tokens") = Field(
        TTT_BOUNDS["agent_max_tokens"].high, description="most agent_max_tokens a request may ask for (else 400)")
    max_num_steps: bounded("num_steps") = Field(
        64, description="recurrent-depth models: most recurrences per position a request may ask for (else 400)")
    max_adapters: int = Field(
        16, ge=0, description="adapters kept for return_adapter, the oldest dropped first; 0 turns exports off")
    adapter_ttl: float = Field(3600.0, gt=0, description="seconds a kept adapter can be fetched")
    max_adapter_bytes: int = Field(
        256 << 20, ge=1, description="bytes all kept adapters may take, rank*(in+out)*4 per adapted layer each")
    max_n: bounded("n") = Field(
        8, description="most answers (n) a request may ask for, and at most max_concurrency: each is a decoding row")

    # -- defaults of a request's sampling parameters -----------------------------------------------------------
    max_tokens: int = Field(256, ge=1, description="answer length when a request sets none")
    temperature: float | None = Field(None, ge=0, le=2, description="default temperature (OpenAI's: 1)")
    top_p: float | None = Field(None, gt=0, le=1, description="default nucleus mass (OpenAI's: 1)")
    top_k: int | None = Field(None, ge=0, description="default top-k, 0 = off")

    _split = field_validator("api_keys", "targets", mode="before")(_split_commas)

    @model_validator(mode="after")
    def _check_ttt_defaults(self) -> Settings:
        # Fail at start-up, not on the first request; the message names the setting as the user wrote it.
        TTTParams().replace(**self.ttt_fields())
        for name, limit in self.limits().items():
            value = getattr(self, name)
            if value is not None and value > limit:
                raise ValueError(f"the default {name} {value} is above {LIMITS[name]} {limit}")
        return self

    @model_validator(mode="after")
    def _check_tenants(self) -> Settings:
        # Read here so that a bad keys file stops `relat serve` before the model loads, naming the problem; the
        # service reads it again (it is small).
        self.tenants()
        if self.tenant_reserve is not None and self.tenant_reserve >= self.max_concurrency:
            raise ValueError(f"tenant_reserve {self.tenant_reserve} must be below max_concurrency "
                             f"{self.max_concurrency}: the places it keeps are places of the batch")
        return self

    def tenant_reserve_places(self, tenant_count: int) -> int:
        """The reserve of server/fair_queue.py for a server with this many tenants: none for one tenant alone."""
        if tenant_count < 2:
            return 0
        if self.tenant_reserve is not None:
            return self.tenant_reserve
        return 1 if self.max_concurrency >= 2 else 0

    def tenants(self) -> TenantDirectory:
        """The tenants of the keys (api_keys as 'default') and of keys_file; KeysFileError for a bad file."""
        return TenantDirectory((key.get_secret_value() for key in self.api_keys), self.keys_file)

    @field_validator("agent_prompts")
    @classmethod
    def _check_agent_prompts(cls, path: Path | None) -> Path | None:
        # Read once here so that a bad file stops `relat serve` before the model loads, with the file's problem
        # as the message; the loader reads it again for the engine (it is small).
        if path is not None:
            AgentPrompts.load(path)
        return path

    def limits(self) -> dict[str, int]:
        """This server's maximum of each TTT field in LIMITS."""
        return {name: getattr(self, setting) for name, setting in LIMITS.items()}

    @property
    def answers_limit(self) -> int:
        """The most answers a request may ask for: max_n, within the decoding rows of the engine's batch."""
        return min(self.max_n, self.max_concurrency)

    def sampling_defaults(self) -> dict[str, Any]:
        """The sampling fields the operator set, as SamplingParams keyword arguments."""
        values = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        return {"max_tokens": self.max_tokens, **values}


# -- the same definition as command-line flags ------------------------------------------------------------------

_FLAG_NAMES = {"api_keys": "--api-key"}  # repeatable: one key per flag
_LIMITED = {setting: name for name, setting in LIMITS.items()}  # max_steps -> steps: its range


def _flag_kind(annotation: Any) -> tuple[Any, tuple[str, ...] | None]:
    """(int, float, str, bool, Path or list; the allowed values of a Literal) from a field's annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _flag_kind(next(a for a in typing.get_args(annotation) if a is not type(None)))
    if origin is typing.Annotated:
        return _flag_kind(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return str, typing.get_args(annotation)
    if origin is list:
        return list, None
    return annotation, None


def _add_field_argument(parser: argparse.ArgumentParser, name: str, field: FieldInfo, default: Any,
                        environment: bool) -> None:
    """The flag of one field: its name with dashes, its type or choices, its description as the help."""
    flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
    kind, choices = _flag_kind(field.annotation)
    bound = BOUNDS.get(name) or BOUNDS.get(_LIMITED.get(name, ""))
    help_text = f"{field.description} ({bound.describe()})" if bound else field.description
    if environment:
        help_text += f" [RELAT_{name.upper()}]"
    options: dict[str, Any] = {"dest": name, "default": default, "help": help_text}
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif kind is list and name in _FLAG_NAMES:
        options["action"] = "append"
    elif kind is list:
        options.update(type=_split_commas, metavar="A,B,...")  # comma-separated, as in the environment
    elif kind is Path:
        options.update(type=Path, metavar="FILE")
    else:
        options.update(type=kind, choices=choices)
    parser.add_argument(flag, **options)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; unset flags stay out of the namespace so that the environment still applies."""
    # The server's own settings first, then the TTT defaults (inherited, so pydantic lists them first).
    names = [name for name in Settings.model_fields if name not in TTT_FIELDS] + list(TTT_FIELDS)
    for name in names:
        _add_field_argument(parser, name, Settings.model_fields[name], argparse.SUPPRESS, environment=True)


def add_ttt_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TTT option, as `relat serve` has them (`relat ask`: a request's options); unset, None."""
    for name in TTT_FIELDS:
        _add_field_argument(parser, name, TTTOptions.model_fields[name], None, environment=False)


def add_agent_prompts_argument(parser: argparse.ArgumentParser) -> None:
    """`--agent-prompts FILE` as `relat serve` has it, for a command that builds its own engine; unset, None."""
    _add_field_argument(parser, "agent_prompts", Settings.model_fields["agent_prompts"], None, environment=False)


def ttt_fields_from_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The TTT options given as flags (`add_ttt_arguments`), as TTTParams keyword arguments; InvalidParameter (the
    engine's message) for the first that is out of range."""
    try:
        return TTTOptions(**{name: getattr(args, name) for name in TTT_FIELDS}).ttt_fields()
    except ValidationError as error:
        problem = error.errors()[0]
        raise InvalidParameter(".".join(map(str, problem["loc"])), problem["msg"]) from None


def settings_from_arguments(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags given (init arguments beat the environment)."""
    given = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    return Settings(**given)
