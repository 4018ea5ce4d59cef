"""Tenants: who a request's API key belongs to, and the limits that tenant runs under.

A key belongs to a tenant. Keys given with `--api-key` (RELAT_API_KEYS) form the tenant `default`; a keys file
(`--keys-file`, RELAT_KEYS_FILE) names more, each by the SHA-256 digest of its key, never the key itself:

    {"tenants": [{"name": "a", "key_sha256": "<64 hex digits>", "max_concurrency": 2, "max_queue": 8,
                  "requests_per_minute": 60}]}

Every field but name and key_sha256 is optional. A keyless server's requests form one tenant, `anonymous`.
The tenant is what partitions the adapter cache and the exported adapters, labels the per-tenant metrics and names
the access log's lines; its limits are the runner's (server/runner.py). Its name may be shown (metrics, logs), its
key never is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError


@dataclass(frozen=True)
class Tenant:
    name: str
    max_concurrency: int | None = None  # None: the server decides its share (server/runner.py)
    max_queue: int | None = None  # None: the server's max_queue
    requests_per_minute: int | None = None  # None: no rate limit


ANONYMOUS = Tenant("anonymous")  # a keyless server's requests
DEFAULT = "default"  # the tenant of the --api-key keys

# Names go into metric labels and log lines: short, and nothing that could break either.
TENANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
DIGEST_COMMAND = 'printf %s "$KEY" | sha256sum'  # the line that makes a key's digest (no trailing newline)


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the file and the problem."""


class _TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, StringConstraints(pattern=TENANT_NAME)]
    key_sha256: str
    max_concurrency: int | None = Field(None, ge=1)
    max_queue: int | None = Field(None, ge=0)
    requests_per_minute: int | None = Field(None, ge=1)


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tenants: list[_TenantEntry]


_PLAIN_KEY_FIELDS = ("key", "api_key", "apikey", "token", "secret")


def _is_digest(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def _plain_key_refusal(path: Path, where: str) -> KeysFileError:
    return KeysFileError(
        f"{path}: {where} holds a plain key; the keys file holds only each key's SHA-256 digest, as key_sha256 "
        f"(64 hex digits). Make it with: {DIGEST_COMMAND}")


def parse_keys_file(path: Path) -> dict[bytes, Tenant]:
    """The tenants of a keys file by the raw digest of their key; KeysFileError naming the first problem: a file
    that cannot be read or parsed, an unknown field, a plain key, a duplicate digest or name."""
    try:
        document = json.loads(Path(path).read_text())
    except OSError as error:
        raise KeysFileError(f"{path}: cannot read the keys file: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KeysFileError(f"{path}: the keys file is not JSON: {error}") from None
    # A plain key is refused before anything else, with the line that makes its digest: the message must not
    # send the operator off fixing other fields of a file that should not exist in this form.
    entries = document.get("tenants") if isinstance(document, dict) else None
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict):
            continue
        for field in _PLAIN_KEY_FIELDS:
            if field in entry:
                raise _plain_key_refusal(path, f"tenants[{index}].{field}")
        digest = entry.get("key_sha256")
        if isinstance(digest, str) and not _is_digest(digest):
            raise _plain_key_refusal(path, f"tenants[{index}].key_sha256 (not 64 hex digits)")
    try:
        parsed = _KeysFile.model_validate(document)
    except ValidationError as error:
        problem = error.errors()[0]
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in problem["loc"])
        where = where.lstrip(".") or "the document"
        message = "unknown field" if problem["type"] == "extra_forbidden" else problem["msg"]
        raise KeysFileError(f"{path}: {where}: {message}") from None
    tenants: dict[bytes, Tenant] = {}
    names: set[str] = set()
    for index, entry in enumerate(parsed.tenants):
        digest = bytes.fromhex(entry.key_sha256)
        if digest in tenants:
            raise KeysFileError(f"{path}: tenants[{index}].key_sha256: duplicate digest (tenant "
                                f"{tenants[digest].name!r} has the same key)")
        if entry.name in names:
            raise KeysFileError(f"{path}: tenants[{index}].name: duplicate tenant name {entry.name!r}")
        if entry.name == ANONYMOUS.name:
            raise KeysFileError(f"{path}: tenants[{index}].name: {ANONYMOUS.name!r} is the keyless server's tenant")
        names.add(entry.name)
        tenants[digest] = Tenant(entry.name, entry.max_concurrency, entry.max_queue, entry.requests_per_minute)
    return tenants


def key_digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class TenantDirectory:
    """Every accepted key's digest and its tenant: the `--api-key` keys as `default`, then a keys file's tenants.
    Empty: a keyless server, whose requests are all `anonymous`."""

    def __init__(self, api_keys: Iterable[str] = (), keys_file: Path | None = None):
        self._by_digest: dict[bytes, Tenant] = {}
        default = Tenant(DEFAULT)
        for key in api_keys:
            self._by_digest[key_digest(key.encode())] = default
        if keys_file is not None:
            for digest, tenant in parse_keys_file(keys_file).items():
                if tenant.name == DEFAULT and self._by_digest:
                    raise KeysFileError(f"{keys_file}: the tenant name {DEFAULT!r} is taken by the --api-key keys")
                if digest in self._by_digest:
                    raise KeysFileError(f"{keys_file}: tenant {tenant.name!r}: its key is also an --api-key key")
                self._by_digest[digest] = tenant

    @property
    def has_keys(self) -> bool:
        return bool(self._by_digest)

    @property
    def tenants(self) -> list[Tenant]:
        """Each tenant once, in the order they were declared."""
        return list(dict.fromkeys(self._by_digest.values()))

    def find(self, token: bytes) -> Tenant | None:
        """The tenant of a key, or None. Every digest is compared, with no early exit, so the time taken says
        nothing about which key came close; digests are of equal length whatever the key's."""
        given = key_digest(token)
        found: Tenant | None = None
        for digest, tenant in self._by_digest.items():
            if hmac.compare_digest(given, digest):
                found = tenant
        return found
