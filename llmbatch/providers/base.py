"""The provider interface: one async method, ``aclose``, and an async context manager."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import httpx2

from llmbatch.models import Embedding, EmbeddingRequest, Request, Response

__all__ = [
    "MAX_CONNECTIONS",
    "Admission",
    "AsyncClosing",
    "Provider",
    "SupportsEmbeddings",
    "never_connected",
]

#: connections an SDK client may hold: as many requests as llmbatch keeps in flight
#: (its safety cap; the SDKs' default pools hold 1,000, aiohttp's 100)
MAX_CONNECTIONS = 2048


class Admission(dict[str, float]):
    """What a request costs at admission, by unit: ``requests``, ``tokens``,
    ``input_tokens``, ``output_tokens`` (the limiter's ``acquire`` keywords)."""


class AsyncClosing:
    """``async with obj:`` for anything with an async ``aclose()``: returns the object,
    and closes it on the way out (providers and clients inherit this)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release what the object holds."""


@runtime_checkable
class Provider(Protocol):
    """Something that answers :class:`Request` objects.

    Attributes:
        name: ``"openai"``, ``"anthropic"``, ``"local"``, ``"fake"``...
        quota_key: a fingerprint of the credentials (never the key itself), so that
            limiters are shared per quota.
        refunds_unused: (optional, default ``False``) whether the provider gives back
            the unused part of what :meth:`admission` reserved once it knows the usage
            (Anthropic does; OpenAI keeps its reservation).
    """

    name: str
    quota_key: str

    async def complete(self, request: Request) -> Response:
        """Answer one request; raise :mod:`llmbatch.errors` exceptions only."""
        ...

    def admission(self, request: Request, model: str) -> Admission:
        """What *request* costs against the provider's rate limits when it is admitted."""
        ...

    def settlement(self, request: Request, response: Response) -> Admission:
        """What the call finally cost against the limits, by the provider's own rule
        (units left out are not settled)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class SupportsEmbeddings(Protocol):
    """A provider that embeds texts (OpenAI and compatible servers): its rate-limit
    rules take embedding requests too."""

    async def embed(self, request: EmbeddingRequest) -> Embedding:
        """Embed one text; raise :mod:`llmbatch.errors` exceptions only."""
        ...

    def admission(self, request: Request | EmbeddingRequest, model: str) -> Admission:
        """What *request* (a completion or an embedding) costs at admission."""
        ...

    def settlement(
        self, request: Request | EmbeddingRequest, response: Response | Embedding
    ) -> Admission:
        """What the call finally cost against the limits."""
        ...


# -- telling a connection never made from one lost: for every SDK on httpx2/aiohttp ----


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """*exc* and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _connect_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean "no connection was established": httpx2's (the
    SDKs' transport, which maps refused, DNS, TLS handshake and connect-timeout errors
    onto them), legacy httpx's if a caller passed such a client, and refused or
    unresolvable sockets raised bare by a custom transport."""
    found: list[type[BaseException]] = [
        httpx2.ConnectError,
        httpx2.ConnectTimeout,
        ConnectionRefusedError,
        socket.gaierror,
    ]
    legacy = sys.modules.get("httpx")  # only if something imported it already
    if legacy is not None:
        found += [getattr(legacy, "ConnectError", httpx2.ConnectError)]
        found += [getattr(legacy, "ConnectTimeout", httpx2.ConnectTimeout)]
    return tuple(found)


def never_connected(exc: BaseException) -> bool:
    """Whether *exc* (an SDK's connection or timeout error) means the connection was
    never established: refused, name not resolved, TLS handshake failed, or connect
    timeout. Then nothing reached the server and the attempt cost nothing; a read
    timeout, a connection reset mid-response or an unreadable body did reach it.

    Walks ``__cause__``/``__context__``: the SDKs raise their ``APIConnectionError``
    from httpx2's exception, itself raised from httpcore2's and the socket's.
    """
    errors = _connect_errors()
    aiohttp = sys.modules.get("aiohttp")  # its errors can be in the chain only if loaded
    for link in _chain(exc):
        if aiohttp is not None and isinstance(link, aiohttp.ClientError):
            # The aiohttp transport maps every lost connection, one dropped mid-answer
            # included, onto httpx2.ConnectTimeout: aiohttp's own class tells.
            return isinstance(link, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
    return any(isinstance(link, errors) for link in _chain(exc))
