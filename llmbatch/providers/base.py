"""The provider interface: one async method, ``aclose``, and an async context manager."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from llmbatch.models import Request, Response

__all__ = ["Admission", "AsyncClosing", "Provider"]


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
