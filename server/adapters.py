"""Exported adapters (`return_adapter`), kept for a while so that the client can fetch them: GET /v1/adapters/{id}.

The store keeps each request's AdapterExport (fp32 tensors on the CPU, relat_core/export.py) under an unguessable
id, at most `max_adapters` of them and `max_adapter_bytes` in all, each for `adapter_ttl` seconds: a new one pushes
out the oldest past either bound, and expired ones go at every put and get. The zip is built when fetched, so the
store's memory is the tensors' bytes alone, the figure the bound counts. Written from the engine's thread (as each
request finishes), read from the event loop: one lock.

An adapter belongs to the tenant whose request made it (server/tenants.py): it was trained to rebuild that tenant's
prompt and can leak it. Asked for by another tenant, it is not there: the same None (a 404 with the same body) as
an id never issued, so that an id's existence is not confirmed either. Ids hold 128 random bits.
"""

from __future__ import annotations

import hmac
import io
import secrets
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from relat_core.export import AdapterExport


@dataclass(frozen=True)
class KeptAdapter:
    id: str
    export: AdapterExport
    expires_at: float  # unix time
    owner: str  # the tenant's name

    @property
    def url(self) -> str:
        return f"/v1/adapters/{self.id}"

    def reference(self) -> dict:
        """What the trace adds to the adapter's summary: where to fetch it, and until when."""
        return {"id": self.id, "url": self.url, "expires_at": int(self.expires_at)}

    def archive(self) -> bytes:
        """A zip of PEFT's folder (adapter_config.json, adapter_model.safetensors); stored, not deflated: float
        weights barely compress."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for name, content in self.export.files().items():
                archive.writestr(name, content)
        return buffer.getvalue()


class AdapterStore:
    def __init__(self, max_count: int, ttl: float, max_bytes: int, clock: Callable[[], float] = time.time):
        self.max_count = max_count
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.clock = clock  # tests move time on
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, KeptAdapter] = OrderedDict()  # oldest first

    @property
    def enabled(self) -> bool:
        return self.max_count > 0

    def put(self, export: AdapterExport, owner: str) -> KeptAdapter:
        """Keep an export for the tenant `owner` (one over max_bytes on its own is the caller's to refuse
        beforehand)."""
        kept = KeptAdapter("adapter-" + secrets.token_hex(16), export, self.clock() + self.ttl, owner)
        with self._lock:
            self._expire()
            while self._kept and (len(self._kept) >= self.max_count
                                  or self._bytes() + export.nbytes > self.max_bytes):
                self._kept.popitem(last=False)
            self._kept[kept.id] = kept
        return kept

    def get(self, adapter_id: str, owner: str) -> KeptAdapter | None:
        """The adapter if it is kept and `owner`'s; None alike for an unknown id and another tenant's."""
        with self._lock:
            self._expire()
            kept = self._kept.get(adapter_id)
        # compare_digest: the time taken does not tell a near-miss name from a far one (names are not secret, but
        # nothing here should hint at whose an id is).
        return kept if kept is not None and hmac.compare_digest(kept.owner, owner) else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes()

    def _bytes(self) -> int:
        return sum(kept.export.nbytes for kept in self._kept.values())

    def _expire(self) -> None:
        now = self.clock()
        for adapter_id in [k for k, kept in self._kept.items() if kept.expires_at <= now]:
            del self._kept[adapter_id]
