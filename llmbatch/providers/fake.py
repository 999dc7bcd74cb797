"""``FakeProvider(handler)``: a provider whose answers come from a function.

For tests, yours and ours, in the spirit of httpx's ``MockTransport(handler)``::

    provider = FakeProvider(lambda request: request.messages[-1]["content"].upper())

The handler receives the :class:`~llmbatch.models.Request` and returns the text, a full
:class:`~llmbatch.models.Response`, or raises an :mod:`llmbatch.errors` exception to
simulate a failure (``raise RateLimited("slow down", retry_after=1)``). It may be a
coroutine function. Usage is estimated from the texts when the handler gives text.

Import it from :mod:`llmbatch.testing`, with the other test doubles.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from llmbatch.models import Request, Response, Usage
from llmbatch.providers.base import Admission, AsyncClosing

__all__ = ["FakeProvider"]

Handler = Callable[[Request], "str | Response | Awaitable[str | Response]"]


class FakeProvider(AsyncClosing):
    """A provider answering with ``handler(request)``; counts its calls in ``calls``."""

    def __init__(self, handler: Handler, *, name: str = "fake") -> None:
        self._handler = handler
        self.name = name
        self.quota_key = "fake"
        #: every request received, in order
        self.calls: list[Request] = []

    def __repr__(self) -> str:
        return f"<FakeProvider {self.name} calls={len(self.calls)}>"

    def admission(self, request: Request, model: str) -> Admission:
        """One request and a rough token count (characters / 4 + max_tokens)."""
        chars = sum(len(str(m.get("content", ""))) for m in request.messages)
        return Admission(requests=1, tokens=chars // 4 + (request.max_tokens or 0))

    def settlement(self, request: Request, response: Response) -> Admission:
        """Nothing to settle: the admission cost is final."""
        return Admission()

    async def complete(self, request: Request) -> Response:
        """Call the handler (awaiting it if needed) and wrap text into a Response."""
        self.calls.append(request)
        answer = self._handler(request)
        if inspect.isawaitable(answer):
            answer = await answer
        if isinstance(answer, Response):
            return answer
        prompt_chars = sum(len(str(m.get("content", ""))) for m in request.messages)
        return Response(
            text=answer,
            model=request.model,
            usage=Usage(
                input_tokens=max(1, prompt_chars // 4), output_tokens=max(1, len(answer) // 4)
            ),
            finish_reason="stop",
            key=request.key,
        )
