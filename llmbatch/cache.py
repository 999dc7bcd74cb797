"""A response cache across jobs: never pay twice for the same answer.

The cache is content-addressed. :func:`cache_key` hashes what decides an answer (the
provider, its endpoint, the model, the messages and every parameter that changes the
output); the value is what the provider answered (:class:`CachedResponse`: the text, the
model that answered, the usage, the finish reason, the refusal, the cost at the time and
the request id) as JSON. Parsed objects are not stored: the client validates the text
again, against the response model of the day. Headers are not stored either.

What is in the key, and what is not
-----------------------------------

======================================  ==================================================
in the key                              why
======================================  ==================================================
``provider``                            another provider, another model family
``endpoint`` (base URL)                 two OpenAI-compatible servers differ; its user and
                                        password are dropped, its query is kept
``model``                               must be resolved first (``ValueError`` if ``None``)
``messages``                            the prompt, in order
``max_tokens``, ``temperature``, ``n``  shape the answer (resolve the client's default
                                        ``max_tokens`` first, as ``LLMClient`` does)
``response_format``                     JSON mode / a raw ``json_schema``
``request.schema.fingerprint``          a ``response_model``'s name and JSON Schema
``extra``                               every other provider parameter (``seed``,
                                        ``top_p``, ``stop``, ``tools``, ``extra_body``...)
======================================  ==================================================

Not in the key: the item's ``key`` (two items asking the same thing share an answer),
the API key (never part of a request; credential-like entries of ``extra_headers`` and
``extra_query`` such as ``Authorization`` or ``api-key`` are dropped), and the ``extra``
parameters that do not change the answer: ``timeout``, ``user``, ``metadata``, ``store``
and ``service_tier``. A response model's Python class is not in it either, only its
schema: the answer is validated by the class of the day.

The key is the SHA-256 of canonical JSON (sorted keys, ``(",", ":")`` separators, ASCII
only, no NaN; integral floats written as integers, so ``temperature=0`` and ``0.0`` are
one key), with a format version: stable across processes, hosts and Python versions.
A value without a stable JSON form (an object, bytes, a non-string dict key) makes the
request uncacheable (:meth:`CachePolicy.key_for` returns ``None``) rather than guessed at.

Samples
-------

A request with ``temperature > 0`` or ``n > 1`` asks for samples, and serving the first
sample forever would be wrong: they are cached only with ``cache_sampled=True``. A
request that leaves ``temperature`` unset (``None``) *is* cached, although OpenAI and
Anthropic then sample at 1.0: whoever left it unset asked for an answer, not for a fresh
draw, which is also what the checkpoint of a job assumes. To draw again, set a
temperature explicitly, or use ``mode="refresh"``.

Degrading, never failing
------------------------

A cache is an optimisation: a corrupt file, a locked database, an unreachable Redis or a
value that does not decode is a miss (or a skipped write), counted in
:attr:`CacheStatistics.errors` and logged as one WARNING (then at most one every
``warn_every`` seconds, with the number of failures in between), never an exception.
After a failure the backend is left alone for ``retry_interval`` seconds (every lookup
is a miss at once), so a locked or unreachable cache costs one timeout, not one per
request. The cache is its own file or server: it never shares a connection, a lock or a
transaction with a job's checkpoint.

Backends: :class:`SQLiteCache` (one file; the default lives under the user's cache
directory, :func:`default_cache_path`), :class:`RedisCache` (shared by processes and
hosts; the ``redis`` extra), and :class:`MemoryCache` (one process). :func:`open_cache`
builds one from ``"off"``, a path, ``"redis://..."`` or ``"memory"``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import math
import os
import re
import sqlite3
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, TypeVar, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from llmbatch._log import get_logger
from llmbatch.config import read_settings
from llmbatch.errors import redact
from llmbatch.models import Request, Response, Usage

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "CacheMode",
    "CachePolicy",
    "CacheSettings",
    "CacheStatistics",
    "CachedResponse",
    "MemoryCache",
    "RedisCache",
    "ResponseCache",
    "SQLiteCache",
    "SupportsClaim",
    "SupportsRelease",
    "cache_key",
    "cache_settings",
    "default_cache_path",
    "open_cache",
    "sampled",
]

logger = get_logger("llmbatch.cache")

T = TypeVar("T")

#: the version of the key's recipe and of the stored value (bump to start afresh)
KEY_VERSION = 1
VALUE_VERSION = 1

CacheMode = Literal["read-write", "read-only", "refresh", "off"]
_MODES: tuple[str, ...] = ("read-write", "read-only", "refresh", "off")

#: ``extra`` parameters that change how a request travels or is billed, not its answer
_NOT_IN_KEY = frozenset({"timeout", "user", "metadata", "store", "service_tier"})
#: header and query names that carry credentials (dropped from ``extra_headers``/``extra_query``)
_CREDENTIAL = re.compile(r"auth|api[-_]?key|token|secret|passw|cookie|session", re.IGNORECASE)


# --- the key -----------------------------------------------------------------------------


def _canonical(value: Any, where: str) -> Any:
    """*value* as plain JSON values with one spelling each, or ``TypeError``."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{where}: {value!r} has no JSON form")
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for name, item in value.items():
            if not isinstance(name, str):
                # json.dumps would write 1 and "1" alike: two requests, one key
                raise TypeError(f"{where}: the key {name!r} is not a string")
            out[name] = _canonical(item, f"{where}.{name}")
        return out
    if isinstance(value, list | tuple):
        return [_canonical(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"{where}: a {type(value).__name__} has no stable JSON form")


def _endpoint(url: str | None) -> str | None:
    """The base URL as keyed: no user or password, lower-case scheme and host, no
    trailing slash, no fragment."""
    if url is None:
        return None
    parts = urlsplit(url.strip())
    if not parts.scheme or not parts.netloc:
        return url.strip().rstrip("/")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), parts.query, ""))


def _extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The ``extra`` parameters that change the answer (credentials left out)."""
    kept: dict[str, Any] = {}
    for name, value in extra.items():
        if name in _NOT_IN_KEY:
            continue
        if name in ("extra_headers", "extra_query") and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if not _CREDENTIAL.search(str(k))}
            if not value:
                continue  # only credentials: as if none were given
        kept[name] = value
    return kept


def cache_key(request: Request, *, provider: str, endpoint: str | None = None) -> str:
    """The cache key of *request*: the SHA-256 (hex) of the canonical JSON of what
    decides its answer (see the module docstring for what is in it and what is not).

    Args:
        request: the request as it is sent: the client's defaults (model, max_tokens)
            already filled in.
        provider: the provider's name (``"openai"``, ``"anthropic"``, ``"local"``...).
        endpoint: the base URL, for providers that may point at several servers.

    Raises:
        ValueError: the request has no model yet (the client's default would be keyed
            as "no model", and shared by clients with different defaults).
        TypeError: a message or parameter has no stable JSON form (an object, bytes,
            NaN): such a request cannot be cached.
    """
    if request.model is None:
        raise ValueError("resolve the request's model before keying it (model is None)")
    schema = request.schema
    payload = {
        "v": KEY_VERSION,
        "provider": provider,
        "endpoint": _endpoint(endpoint),
        "model": request.model,
        "messages": request.messages,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "n": request.n,
        "response_format": request.response_format,
        "schema": schema.fingerprint if schema is not None else None,
        "extra": _extra(request.extra),
    }
    blob = json.dumps(
        _canonical(payload, "request"),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def sampled(request: Request) -> bool:
    """Whether *request* asks for samples: ``temperature > 0`` (an explicit one, in
    ``extra`` too) or several completions (``n > 1``). An unset temperature is not a
    sample request (see "Samples" in the module docstring)."""
    temperature = request.extra.get("temperature", request.temperature)
    return request.n > 1 or (isinstance(temperature, int | float) and temperature > 0)


# --- the policy --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CachePolicy:
    """How a client uses its cache.

    Args:
        mode: ``"read-write"`` (serve hits, store answers), ``"read-only"`` (serve hits,
            store nothing), ``"refresh"`` (never serve, always store: redraw and
            overwrite), ``"off"``.
        ttl: seconds an answer stays good: stored answers expire after it, and answers
            older than it are not served (even those stored without one, or with a
            longer one). ``None``: forever.
        cache_sampled: cache requests that ask for samples too (:func:`sampled`).
    """

    mode: CacheMode = "read-write"
    ttl: float | None = None
    cache_sampled: bool = False

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"cache mode must be one of {', '.join(_MODES)}, not {self.mode!r}")
        if self.ttl is not None and not self.ttl > 0:
            raise ValueError(f"cache ttl must be > 0 seconds (or None), not {self.ttl!r}")

    @property
    def reads(self) -> bool:
        """Hits are served (``read-write``, ``read-only``)."""
        return self.mode in ("read-write", "read-only")

    @property
    def writes(self) -> bool:
        """Answers are stored (``read-write``, ``refresh``)."""
        return self.mode in ("read-write", "refresh")

    def copy(self, **changes: Any) -> CachePolicy:
        """This policy with *changes* (``policy.copy(mode="refresh")``)."""
        return replace(self, **changes)

    def key_for(
        self, request: Request, *, provider: str, endpoint: str | None = None
    ) -> str | None:
        """The key to look *request* up under, or ``None`` when it stays out of the
        cache: the mode is ``"off"``, it asks for samples and ``cache_sampled`` is off,
        or a parameter has no stable JSON form.

        Raises:
            ValueError: the request has no model yet (:func:`cache_key`).
        """
        if self.mode == "off" or (sampled(request) and not self.cache_sampled):
            return None
        try:
            return cache_key(request, provider=provider, endpoint=endpoint)
        except TypeError as exc:
            logger.debug("cache.uncacheable", item_key=request.key, reason=str(exc))
            return None


# --- the value ---------------------------------------------------------------------------


def _text(record: Mapping[str, Any], name: str) -> str | None:
    value = record.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} is a {type(value).__name__}")
    return value


def _number(record: Mapping[str, Any], name: str) -> float | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} is a {type(value).__name__}")
    return float(value)


def _count(usage: Mapping[str, Any], name: str) -> int:
    value = usage.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"usage.{name} is {value!r}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class CachedResponse:
    """An answer as the cache keeps it.

    Attributes:
        text: the answer's text (a typed answer's JSON: the client validates it again).
        model: the model that answered.
        provider: the provider that answered (``Response.provider``).
        usage: the tokens the original call consumed (``cached_tokens`` included).
        finish_reason: why the output stopped.
        refusal: the model's refusal, if it declined.
        cost: what the original call cost in USD (``None``: prices unknown); a hit
            saves it (:attr:`CacheStatistics.saved_cost`).
        request_id: the provider's request id of the original call.
        created: when it was stored (the cache's clock, seconds since the epoch).
        expires: when it stops being served (``None``: never).
    """

    text: str
    model: str | None = None
    provider: str | None = None
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    refusal: str | None = None
    cost: float | None = None
    request_id: str | None = None
    created: float = 0.0
    expires: float | None = None

    @classmethod
    def of(cls, response: Response, *, created: float, ttl: float | None = None) -> Self:
        """What the cache keeps of *response*, stored at *created* for *ttl* seconds."""
        return cls(
            text=response.text,
            model=response.model,
            provider=response.provider,
            usage=response.usage,
            finish_reason=response.finish_reason,
            refusal=response.refusal,
            cost=response.cost,
            request_id=response.request_id,
            created=created,
            expires=None if ttl is None else created + ttl,
        )

    def response(self, *, key: str | None = None) -> Response:
        """The answer as a :class:`Response` to serve: ``attempts=0`` and ``cost=0.0``
        (no call was made, nothing was paid; :attr:`cost` is what it cost first),
        ``parsed`` left for the client to validate."""
        return Response(
            text=self.text,
            model=self.model,
            provider=self.provider,
            usage=self.usage,
            finish_reason=self.finish_reason,
            request_id=self.request_id,
            attempts=0,
            refusal=self.refusal,
            key=key,
            cost=0.0,
        )

    def fresh(self, now: float, *, max_age: float | None = None) -> bool:
        """Whether it may be served at *now*: not expired, nor older than *max_age*."""
        if self.expires is not None and now >= self.expires:
            return False
        return max_age is None or now - self.created < max_age

    def encode(self) -> str:
        """The stored form: one JSON object."""
        return json.dumps(
            {
                "v": VALUE_VERSION,
                "text": self.text,
                "model": self.model,
                "provider": self.provider,
                "usage": {
                    "input_tokens": self.usage.input_tokens,
                    "output_tokens": self.usage.output_tokens,
                    "cached_tokens": self.usage.cached_tokens,
                    "cache_write_tokens": self.usage.cache_write_tokens,
                },
                "finish_reason": self.finish_reason,
                "refusal": self.refusal,
                "cost": self.cost,
                "request_id": self.request_id,
                "created": self.created,
                "expires": self.expires,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, data: str | bytes) -> Self:
        """The value :meth:`encode` made.

        Raises:
            ValueError: it is not one (garbage, another version, a field of a wrong type).
        """
        record = json.loads(data)
        if not isinstance(record, dict) or record.get("v") != VALUE_VERSION:
            raise ValueError("not a cached response of this version")
        usage = record.get("usage") or {}
        if not isinstance(usage, dict):
            raise ValueError("usage is not an object")
        text = record.get("text")
        if not isinstance(text, str):
            raise ValueError("text is not a string")
        return cls(
            text=text,
            model=_text(record, "model"),
            provider=_text(record, "provider"),
            usage=Usage(
                input_tokens=_count(usage, "input_tokens"),
                output_tokens=_count(usage, "output_tokens"),
                cached_tokens=_count(usage, "cached_tokens"),
                cache_write_tokens=_count(usage, "cache_write_tokens"),
            ),
            finish_reason=_text(record, "finish_reason"),
            refusal=_text(record, "refusal"),
            cost=_number(record, "cost"),
            request_id=_text(record, "request_id"),
            created=_number(record, "created") or 0.0,
            expires=_number(record, "expires"),
        )


# --- the contract ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheStatistics:
    """What a cache did since it was opened.

    Attributes:
        hits: lookups answered from the cache.
        misses: lookups not answered (absent, expired, undecodable, or the cache
            unusable).
        writes: answers stored.
        errors: failures that degraded to a miss or a skipped write.
        saved_cost: the cost (USD, at the time) of the answers served from the cache.
    """

    hits: int = 0
    misses: int = 0
    writes: int = 0
    errors: int = 0
    saved_cost: float = 0.0


@runtime_checkable
class ResponseCache(Protocol):
    """What the client needs of a cache. None of the methods raise for a cache that
    cannot be used: they miss, or skip the write."""

    #: where the answers are kept, for logs (a path, a URL without its password)
    where: str

    async def get(self, key: str, *, max_age: float | None = None) -> CachedResponse | None:
        """The answer stored under *key*, unless absent, expired or older than *max_age*."""
        ...

    async def put(self, key: str, response: Response, *, ttl: float | None = None) -> bool:
        """Store *response* under *key* for *ttl* seconds (``None``: forever); whether
        it was stored."""
        ...

    def statistics(self) -> CacheStatistics:
        """Hits, misses, writes, errors and the money saved so far."""
        ...

    async def aclose(self) -> None:
        """Release the file or connection (later calls miss)."""
        ...


@runtime_checkable
class SupportsRelease(Protocol):
    """A cache that holds connections of one event loop (:class:`RedisCache`)."""

    async def release(self) -> None:
        """Close what it opened in the running loop; stay usable."""
        ...


@runtime_checkable
class SupportsClaim(Protocol):
    """A cache shared by processes that can also say who answers a request, so that
    concurrent jobs never send the same one twice (:class:`RedisCache`)."""

    async def claim(self, key: str, *, seconds: float) -> bool:
        """``True``: send the request (and :meth:`unclaim` once it is stored);
        ``False``: another process is answering it."""
        ...

    async def unclaim(self, key: str) -> None:
        """Give up the claim on *key*."""
        ...


class _Cache:
    """What the backends share: the counters, the clock, and degrading to a miss.

    A backend implements ``_read(key) -> str | bytes | None``, ``_write(key, value,
    cached) -> bool`` (``False``: skipped, the storage being left alone) and
    ``_close()``, and raises whatever its storage raises: any ``Exception`` from them is
    a miss or a skipped write here.
    """

    def __init__(
        self,
        *,
        where: str,
        clock: Callable[[], float],
        retry_interval: float,
        warn_every: float,
    ) -> None:
        self.where = where
        self._clock = clock
        self._retry_interval = retry_interval
        self._warn_every = warn_every
        self._hits = 0
        self._misses = 0
        self._writes = 0
        self._errors = 0
        self._saved = 0.0
        self._closed = False
        self._down_until = -math.inf  # time.monotonic(): left alone until then
        self._failing = False
        self._warned_at = -math.inf
        self._suppressed = 0

    def __repr__(self) -> str:
        s = self.statistics()
        state = "closed" if self._closed else "failing" if self._failing else "ok"
        return (
            f"<{type(self).__name__} {self.where} {state} hits={s.hits} misses={s.misses} "
            f"writes={s.writes} errors={s.errors}>"
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def statistics(self) -> CacheStatistics:
        """Hits, misses, writes, errors and the money saved so far."""
        return CacheStatistics(
            hits=self._hits,
            misses=self._misses,
            writes=self._writes,
            errors=self._errors,
            saved_cost=self._saved,
        )

    async def get(self, key: str, *, max_age: float | None = None) -> CachedResponse | None:
        """The answer stored under *key*: ``None`` if there is none, it expired, it is
        older than *max_age* seconds, it does not decode, or the cache cannot be used."""
        if not self._usable():
            self._misses += 1
            return None
        try:
            data = await self._read(key)
        except Exception as exc:
            self._failed("read", exc)
            self._misses += 1
            return None
        self._recovered()
        if data is None:
            self._misses += 1
            return None
        try:
            cached = CachedResponse.decode(data)
        except (ValueError, TypeError) as exc:  # JSONDecodeError, UnicodeDecodeError too
            self._errors += 1
            self._warn("decode", exc, "the stored value is not an answer: it is ignored")
            self._misses += 1
            return None
        if not cached.fresh(self._clock(), max_age=max_age):
            self._misses += 1
            return None
        self._hits += 1
        self._saved += cached.cost or 0.0
        return cached

    async def put(self, key: str, response: Response, *, ttl: float | None = None) -> bool:
        """Store *response* under *key* for *ttl* seconds (``None``: forever), replacing
        what was there; ``False`` when the cache cannot be used (the answer is not lost:
        the caller has it)."""
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be > 0 seconds (or None), not {ttl!r}")
        if not self._usable():
            return False
        cached = CachedResponse.of(response, created=self._clock(), ttl=ttl)
        try:
            if not await self._write(key, cached.encode(), cached):
                return False
        except Exception as exc:
            self._failed("write", exc)
            return False
        self._recovered()
        self._writes += 1
        return True

    async def aclose(self) -> None:
        """Release the storage (later calls miss, and skip their writes)."""
        if not self._closed:
            self._closed = True
            await self._close()

    # -- for the backends --

    async def _read(self, key: str) -> str | bytes | None:
        raise NotImplementedError

    async def _write(self, key: str, value: str, cached: CachedResponse) -> bool:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    def _advice(self, exc: Exception) -> str:
        """What to tell the user about *exc*."""
        return "answers are requested as if there were no cache"

    def _describe(self, exc: Exception) -> str:
        """*exc* as a log line may show it."""
        return redact(f"{type(exc).__name__}: {exc}")

    # -- degrading --

    def _usable(self) -> bool:
        return not self._closed and time.monotonic() >= self._down_until

    def _pause(self) -> None:
        """Leave the storage alone for ``retry_interval`` seconds (also called from
        SQLite's worker thread, so that statements queued behind a failed one are
        skipped instead of each waiting out the busy timeout)."""
        self._down_until = time.monotonic() + self._retry_interval

    def _failed(self, action: str, exc: Exception) -> None:
        """The storage failed: count it, leave it alone for a while, say so (rarely)."""
        self._errors += 1
        self._failing = True
        self._pause()
        self._warn(action, exc, self._advice(exc))

    def _recovered(self) -> None:
        """A call went through: the storage works again (unless the call was skipped)."""
        if self._failing and self._usable():
            self._failing = False
            logger.info("cache.recovered", cache=self.where)

    def _warn(self, action: str, exc: Exception, detail: str) -> None:
        """One WARNING, then at most one every ``warn_every`` seconds."""
        now = time.monotonic()
        if now - self._warned_at < self._warn_every:
            self._suppressed += 1
            logger.debug("cache.failed", cache=self.where, action=action, error=self._describe(exc))
            return
        suppressed, self._suppressed, self._warned_at = self._suppressed, 0, now
        logger.warning(
            "cache.unavailable",
            cache=self.where,
            action=action,
            error=self._describe(exc),
            detail=detail,
            suppressed=suppressed,
        )


# --- memory ------------------------------------------------------------------------------


class MemoryCache(_Cache):
    """A cache in this process's memory (a notebook, tests). Nothing is shared or kept.

    Args:
        max_entries: the most answers kept; the least recently used go first.
        clock: the time in seconds since the epoch (``time.time``; tests pass a fake).
    """

    def __init__(
        self, *, max_entries: int | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(where="memory", clock=clock, retry_interval=0.0, warn_every=300.0)
        self._max_entries = max_entries
        self._values: OrderedDict[str, str] = OrderedDict()

    async def _read(self, key: str) -> str | None:
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    async def _write(self, key: str, value: str, cached: CachedResponse) -> bool:
        self._values[key] = value
        self._values.move_to_end(key)
        while self._max_entries is not None and len(self._values) > self._max_entries:
            self._values.popitem(last=False)
        return True

    async def _close(self) -> None:
        self._values.clear()


# --- SQLite ------------------------------------------------------------------------------

_SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS cache_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    key     TEXT PRIMARY KEY,
    value   TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS responses_by_expiry ON responses (expires) WHERE expires IS NOT NULL;
INSERT OR IGNORE INTO cache_meta (name, value) VALUES ('schema', '1');
"""


#: how the error for a file that is not our cache starts (another program's database,
#: another schema): such a file is neither read nor written, nor advised to be deleted
_NOT_A_CACHE = "not a response cache of this llmbatch"


def _schema_version(db: sqlite3.Connection) -> str | None:
    """The schema the cache file was made with; ``None`` for a new (empty) file.

    Raises:
        sqlite3.DatabaseError: the file holds another program's tables (a job's
            checkpoint given by mistake?): it is neither read nor written.
    """
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        return None
    if "cache_meta" not in tables:
        raise sqlite3.DatabaseError(f"{_NOT_A_CACHE}: its tables are {', '.join(sorted(tables))}")
    row = db.execute("SELECT value FROM cache_meta WHERE name = 'schema'").fetchone()
    return None if row is None else str(row[0])


#: the most the default SQLite cache's answers may take before the oldest go
DEFAULT_MAX_BYTES = 1024**3


def default_cache_path() -> Path:
    """Where the SQLite cache lives unless told otherwise: ``$XDG_CACHE_HOME/llmbatch/
    responses.sqlite`` when that variable holds an absolute path (on any platform),
    else ``~/.cache/llmbatch/`` (Linux and other Unixes), ``~/Library/Caches/llmbatch/``
    (macOS) or ``%LOCALAPPDATA%\\llmbatch\\Cache\\`` (Windows)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "llmbatch" / "responses.sqlite"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "llmbatch" / "responses.sqlite"
    if os.name == "nt":
        local = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(local) / "llmbatch" / "Cache" / "responses.sqlite"
    return Path.home() / ".cache" / "llmbatch" / "responses.sqlite"


class SQLiteCache(_Cache):
    """A cache in one SQLite file, which any number of processes may share.

    Every statement runs in one worker thread of the cache's own, so the event loop never
    waits on the disk; each is a single tiny autocommitted transaction in write-ahead-log
    mode (readers never wait for a writer), and waits at most *busy_timeout* for another
    writer's lock: a ``put`` returns once its row is committed. The file is opened on
    first use; one that cannot be opened (corrupt, locked, not writable, of another
    schema) makes every lookup a miss, with a warning that names it. The file is never
    deleted or rewritten to repair it: delete it to start afresh. Expired rows are
    removed when the file is opened.

    The file stays under *max_bytes* of answers: when they grow past it (checked when
    the file is opened and every 256 writes) the oldest are removed until they fill 80%
    of it, and SQLite reuses their pages (the file itself does not shrink).

    WAL needs a local file system (not NFS or SMB): on a shared drive use Redis.

    Args:
        path: the file (created with its folder); default :func:`default_cache_path`.
        max_bytes: the most the stored answers may take (default 1 GiB; ``None``: no
            bound).
        busy_timeout: seconds a statement waits for another process's lock.
        retry_interval: seconds the file is left alone after a failure.
        warn_every: seconds between two warnings (failures in between are counted).
        clock: the time in seconds since the epoch (``time.time``; tests pass a fake).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        busy_timeout: float = 0.2,
        retry_interval: float = 30.0,
        warn_every: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        super().__init__(
            where=str(self.path),
            clock=clock,
            retry_interval=retry_interval,
            warn_every=warn_every,
        )
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive (or None), not {max_bytes!r}")
        self.max_bytes = max_bytes
        self._busy_timeout = busy_timeout
        self._writes_since_check = 0
        self._db: sqlite3.Connection | None = None  # only ever touched by the worker thread
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="llmbatch-cache"
        )

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, work)

    def _connection(self) -> sqlite3.Connection:
        """The open database (worker thread): opened, set up and pruned on first use."""
        if self._db is not None:
            return self._db
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            version = _schema_version(db)
            if version is None:  # a new file: the only opening that writes
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                version = _schema_version(db)
            if version != _SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"{_NOT_A_CACHE}: schema {version}, this llmbatch reads {_SCHEMA_VERSION}"
                )
            now = self._clock()
            if db.execute("SELECT 1 FROM responses WHERE expires <= ? LIMIT 1", (now,)).fetchone():
                try:
                    db.execute("DELETE FROM responses WHERE expires <= ?", (now,))
                except sqlite3.OperationalError:
                    pass  # another process is writing: prune next time
            self._bound(db)
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _bound(self, db: sqlite3.Connection) -> None:
        """Remove the oldest answers while they take more than ``max_bytes`` (worker
        thread), down to 80% of it."""
        if self.max_bytes is None:
            return
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        used = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        live = (used - free) * page_size
        if live <= self.max_bytes:
            return
        rows = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        drop = math.ceil(rows * (1.0 - 0.8 * self.max_bytes / live))
        try:
            db.execute(
                "DELETE FROM responses WHERE key IN "
                "(SELECT key FROM responses ORDER BY created LIMIT ?)",
                (drop,),
            )
        except sqlite3.OperationalError:
            return  # another process is writing: bound next time
        logger.info(
            "cache.evicted",
            cache=str(self.path),
            answers=drop,
            bytes=live,
            max_bytes=self.max_bytes,
        )

    def _reset(self) -> None:
        """Drop the connection after a failure (worker thread): the next use reopens."""
        if self._db is not None:
            db, self._db = self._db, None
            try:
                db.close()
            except sqlite3.Error:
                pass

    def _select(self, key: str) -> str | bytes | None:
        if not self._usable():
            return None  # a statement before this one failed: a miss, at once
        try:
            row = (
                self._connection()
                .execute("SELECT value FROM responses WHERE key = ?", (key,))
                .fetchone()
            )
        except BaseException:
            self._pause()
            self._reset()
            raise
        return None if row is None else row[0]

    def _insert(self, key: str, value: str, created: float, expires: float | None) -> bool:
        if not self._usable():
            return False
        try:
            db = self._connection()
            db.execute(
                "INSERT OR REPLACE INTO responses (key, value, created, expires) "
                "VALUES (?, ?, ?, ?)",
                (key, value, created, expires),
            )
            self._writes_since_check += 1
            if self._writes_since_check >= 256:
                self._writes_since_check = 0
                self._bound(db)
        except BaseException:
            self._pause()
            self._reset()
            raise
        return True

    async def _read(self, key: str) -> str | bytes | None:
        return await self._run(lambda: self._select(key))

    async def _write(self, key: str, value: str, cached: CachedResponse) -> bool:
        return await self._run(lambda: self._insert(key, value, cached.created, cached.expires))

    async def _close(self) -> None:
        await self._run(self._reset)
        self._worker.shutdown(wait=False)

    def _advice(self, exc: Exception) -> str:
        if str(exc).startswith(_NOT_A_CACHE):
            return (
                f"{self.path} is not a response cache of this llmbatch: it is left alone; "
                "give the cache another path"
            )
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return "another process holds the cache file locked: answers are requested"
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            return f"the cache file is damaged or not a cache: delete {self.path} to start afresh"
        return "the cache file cannot be used: answers are requested as if there were none"


# --- Redis -------------------------------------------------------------------------------


class RedisCache(_Cache):
    """A cache in Redis, shared by every process and host that reaches the server.

    Keys are ``llmbatch:{namespace}:response:{key}``; an answer stored with a ``ttl``
    expires in Redis (server time) as well as being refused once stale by this client's
    clock. Without a ``ttl`` answers stay until Redis evicts them: give the server a
    ``maxmemory`` and ``maxmemory-policy allkeys-lru``, or set a ttl.

    Each command waits at most *timeout* seconds (connecting too). A server that cannot
    be used (down, refusing the password, out of memory) makes lookups misses and skips
    writes, with a warning that shows the URL with its password hidden.

    Args:
        redis: a ``redis://``, ``rediss://`` or ``unix://`` URL (the cache makes and
            closes its own client), or a ``redis.asyncio.Redis`` client (left open).
        namespace: separates applications that share a server.
        timeout: seconds to wait for a connection and for each reply.
        max_connections: commands in flight at most (one connection each).
        retry_interval: seconds the server is left alone after a failure.
        warn_every: seconds between two warnings (failures in between are counted).
        clock: the time in seconds since the epoch (``time.time``; tests pass a fake).

    Raises:
        ImportError: the ``redis`` extra is not installed (for a URL).
        ValueError: the URL is not a Redis URL.
    """

    def __init__(
        self,
        redis: str | Redis,
        *,
        namespace: str = "default",
        timeout: float = 1.0,
        max_connections: int = 16,
        retry_interval: float = 30.0,
        warn_every: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(redis, str):
            client, where = self._client(redis, timeout), redact(redis)
        else:
            client, where = redis, _where(redis)
        super().__init__(
            where=where,
            clock=clock,
            retry_interval=retry_interval,
            warn_every=warn_every,
        )
        self._redis = client
        self._owns_client = isinstance(redis, str)
        self._url = redis if isinstance(redis, str) else None
        self._timeout = timeout
        #: the event loop the client's connections belong to (a URL's client is made
        #: anew for another loop: ``map_sync`` runs each call in its own)
        self._bound: asyncio.AbstractEventLoop | None = None
        self.namespace = namespace
        self._prefix = f"llmbatch:{namespace}:response:"
        self._claims = f"llmbatch:{namespace}:claim:"
        self._max_connections = max_connections
        self._gate: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    @staticmethod
    def _client(url: str, timeout: float) -> Redis:
        try:
            from redis.asyncio import Redis
        except ImportError:
            raise ImportError(
                "a redis:// cache needs the redis client: pip install 'llmbatch[redis]'"
            ) from None
        try:
            return Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        except ValueError as exc:
            message = redact(f"the cache URL {url} is not a Redis URL: {exc}")
        raise ValueError(message)

    def _semaphore(self) -> asyncio.Semaphore:
        """The bound on commands in flight, for the running loop."""
        loop = asyncio.get_running_loop()
        if self._gate is None or self._gate[0] is not loop:
            self._gate = (loop, asyncio.Semaphore(self._max_connections))
        return self._gate[1]

    async def _read(self, key: str) -> str | bytes | None:
        async with self._semaphore():
            value: str | bytes | None = await self._now().get(self._prefix + key)
        return value

    async def _write(self, key: str, value: str, cached: CachedResponse) -> bool:
        expiry = None
        if cached.expires is not None:
            expiry = max(1, math.ceil((cached.expires - cached.created) * 1000))
        async with self._semaphore():
            await self._now().set(self._prefix + key, value, px=expiry)
        return True

    async def claim(self, key: str, *, seconds: float) -> bool:
        """Claim answering *key* for *seconds* across every process sharing the cache
        (``SET NX``): ``True`` when this caller should send the request, ``False``
        when another one is answering it (its answer will be stored). A cache that
        cannot be used claims nothing and says ``True``: the request is sent."""
        if not self._usable():
            return True
        try:
            async with self._semaphore():
                won = await self._now().set(
                    self._claims + key, b"1", nx=True, px=max(1, math.ceil(seconds * 1000))
                )
        except Exception as exc:
            self._failed("claim", exc)
            return True
        return bool(won)

    async def unclaim(self, key: str) -> None:
        """Give up the claim on *key* (answered and stored, or failed: the others may
        try)."""
        if not self._usable():
            return
        try:
            async with self._semaphore():
                await self._now().delete(self._claims + key)
        except Exception as exc:
            self._failed("claim", exc)

    async def _close(self) -> None:
        await self.release()

    async def release(self) -> None:
        """Close the connections this cache opened in the running event loop, and stay
        usable: another loop opens its own (a client leaves a cache it was given open,
        and releases it so at the end of each job)."""
        if self._owns_client and self._bound is asyncio.get_running_loop():
            await self._redis.aclose()
            self._bound = None

    def _now(self) -> Redis:
        """The client for the running event loop (connections belong to one loop)."""
        loop = asyncio.get_running_loop()
        if self._url is not None and self._bound is not loop:
            # (another loop's client is left to that loop: its connections cannot be
            # used, nor closed, from this one)
            self._redis = self._client(self._url, self._timeout)
            self._bound = loop
        return self._redis

    def _describe(self, exc: Exception) -> str:
        text = f"{type(exc).__name__}: {exc}"
        pool = getattr(self._redis, "connection_pool", None)
        password = getattr(pool, "connection_kwargs", {}).get("password")
        if password:
            text = text.replace(str(password), "***")
        return redact(text)

    def _advice(self, exc: Exception) -> str:
        return (
            f"the Redis server at {self.where} cannot be used: answers are requested "
            f"as if there were no cache (retried in {self._retry_interval:g} s)"
        )


def _where(redis: Any) -> str:
    """A client's server, for messages (no password)."""
    kwargs = getattr(getattr(redis, "connection_pool", None), "connection_kwargs", {})
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


# --- from configuration ------------------------------------------------------------------


def open_cache(
    spec: str | os.PathLike[str] | ResponseCache | None,
    *,
    namespace: str = "default",
    clock: Callable[[], float] = time.time,
) -> ResponseCache | None:
    """The cache *spec* names (as ``--cache``, ``cache=`` and ``[cache]`` give it).

    ============================  ==========================================================
    spec                          cache
    ============================  ==========================================================
    ``None``, ``"off"``           none (``None``)
    ``"default"``, ``"on"``       :class:`SQLiteCache` at :func:`default_cache_path`
    ``"memory"``                  :class:`MemoryCache`
    ``redis://``, ``rediss://``,  :class:`RedisCache` (keys under *namespace*)
    ``unix://`` URL
    a path                        :class:`SQLiteCache` in that file (an existing folder:
                                  ``responses.sqlite`` in it)
    a :class:`ResponseCache`      itself
    ============================  ==========================================================

    Nothing is opened or connected yet: a cache that cannot be used shows as misses.

    Raises:
        ValueError: an unknown URL scheme, or a Redis URL that is not one.
        ImportError: a Redis URL without the ``redis`` extra.
        TypeError: *spec* is none of those.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip()
        word = text.lower()
        if word == "off":
            return None
        if word in ("default", "on"):
            return SQLiteCache(clock=clock)
        if word == "memory":
            return MemoryCache(clock=clock)
        scheme = word.partition("://")[0] if "://" in word else ""
        if scheme in ("redis", "rediss", "unix"):
            return RedisCache(text, namespace=namespace, clock=clock)
        if scheme:
            raise ValueError(redact(f"the cache {text!r} is not 'off', a path or a redis:// URL"))
        if not text:
            raise ValueError("the cache is empty: give 'off', a path or a redis:// URL")
        spec = text
    if isinstance(spec, str | os.PathLike):
        path = Path(spec).expanduser()
        if path.is_dir():
            path = path / "responses.sqlite"
        return SQLiteCache(path, clock=clock)
    if isinstance(spec, ResponseCache):
        return spec
    raise TypeError(f"cache must be 'off', a path, a redis:// URL or a cache, not {spec!r}")


# --- the [cache] table -------------------------------------------------------------------

_SETTINGS = ("location", "mode", "ttl_hours", "namespace", "cache_sampled")


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheSettings:
    """The configured cache: ``$LLMBATCH_CACHE`` for the location, then the ``[cache]``
    table of ``llmbatch.toml`` (see :func:`~llmbatch.config.config_file`)::

        [cache]
        location = "redis://cache-host:6379/0"   # or "default", a path, "off"
        mode = "read-write"                      # "read-only", "refresh"
        ttl_hours = 168                          # serve answers a week old at most
        namespace = "team-a"                     # for a shared Redis
        cache_sampled = false                    # cache temperature > 0 requests too

    ``llmbatch run`` and ``llmbatch estimate`` use it unless ``--cache`` says otherwise
    (default location: ``"default"``, a SQLite file in the user cache folder). The
    library stays off unless asked: ``LLMClient(cache=...)``, or
    ``settings = cache_settings(); LLMClient(cache=settings.open(),
    cache_policy=settings.policy())`` for the configured one.

    Attributes:
        location: what :func:`open_cache` takes (``None``: not configured).
        mode: the :class:`CachePolicy` mode.
        ttl: seconds an answer stays good (``None``: forever).
        namespace: the Redis key namespace.
        cache_sampled: cache requests that ask for samples.
    """

    location: str | None = None
    mode: CacheMode = "read-write"
    ttl: float | None = None
    namespace: str = "default"
    cache_sampled: bool = False

    def policy(self) -> CachePolicy:
        """The :class:`CachePolicy` these settings give."""
        return CachePolicy(mode=self.mode, ttl=self.ttl, cache_sampled=self.cache_sampled)

    def open(self, location: str | None = None) -> ResponseCache | None:
        """The cache at *location* (default: :attr:`location`, else ``"default"``), in
        :attr:`namespace`; ``None`` when it is ``"off"`` (see :func:`open_cache`)."""
        return open_cache(location or self.location or "default", namespace=self.namespace)


def cache_settings(path: str | Path | None = None) -> CacheSettings:
    """The :class:`CacheSettings` in force: ``$LLMBATCH_CACHE`` (the location), then
    the ``[cache]`` table of the configuration file *path* (default: see
    :func:`~llmbatch.config.config_file`).

    Raises:
        ValueError: unknown ``[cache]`` settings or values of the wrong kind.
    """
    found, data = read_settings(path)
    table: Mapping[str, Any] = data.get("cache") or {}
    unknown = set(table) - set(_SETTINGS)
    if found is not None and unknown:
        raise ValueError(f"{found.name}: unknown [cache] settings: {sorted(unknown)}")
    where = found.name if found is not None else "[cache]"
    location = os.environ.get("LLMBATCH_CACHE") or table.get("location")
    if location is not None and not isinstance(location, str):
        raise ValueError(f"{where}: [cache] location must be a string, not {location!r}")
    ttl_hours = table.get("ttl_hours")
    if ttl_hours is not None and (
        isinstance(ttl_hours, bool) or not isinstance(ttl_hours, int | float) or ttl_hours <= 0
    ):
        raise ValueError(f"{where}: [cache] ttl_hours must be a number > 0, not {ttl_hours!r}")
    namespace = table.get("namespace", "default")
    sampled_too = table.get("cache_sampled", False)
    if not isinstance(namespace, str) or not isinstance(sampled_too, bool):
        raise ValueError(f"{where}: [cache] namespace is a string and cache_sampled a boolean")
    mode = table.get("mode", "read-write")
    if mode not in _MODES:
        raise ValueError(f"{where}: [cache] mode must be one of {', '.join(_MODES)}, not {mode!r}")
    return CacheSettings(
        location=location,
        mode=mode,
        ttl=None if ttl_hours is None else float(ttl_hours) * 3600.0,
        namespace=namespace,
        cache_sampled=sampled_too,
    )
