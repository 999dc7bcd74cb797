"""Several API keys behind one provider, and fallbacks to other models and providers.

:class:`KeyPool` holds one provider per key of the same service (``OpenAIProvider``
built with each key, say). Each key is its own quota: :class:`~llmbatch.client.LLMClient`
keeps a limiter per key, sends each request through the key with the most room left
at that moment, and retires for the rest of the job a key the provider refuses
(:class:`~llmbatch.errors.AuthenticationFailed`, :class:`~llmbatch.errors.QuotaExhausted`),
with one WARNING line that names it by its fingerprint and last four characters. The job
goes on with the other keys and stops only when none is left::

    pool = KeyPool([OpenAIProvider(api_key=k) for k in os.environ["OPENAI_API_KEYS"].split(",")])
    result = await llmbatch.map("Summarize: {text}", docs, model="gpt-4o-mini", provider=pool)

:class:`Fallback` names another model, on the client's provider or on another one, for
``LLMClient(fallbacks=[...])``: an item the primary cannot answer for a reason another
model can fix is sent there (see :data:`DEFAULT_FALLBACK_ON`), and a primary that is
fatally unusable for the whole job is left for the next route.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llmbatch._log import get_logger
from llmbatch.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    ContentFiltered,
    ContextLengthExceeded,
    LLMBatchError,
    NotFound,
    ProviderUnavailable,
    ProviderUnreachable,
    QuotaExhausted,
    Timeout,
)
from llmbatch.models import Request, Response
from llmbatch.providers.base import Admission, AsyncClosing, Provider

__all__ = [
    "DEFAULT_FALLBACK_ON",
    "JOB_FALLBACK_ON",
    "RETIRES_KEY",
    "Fallback",
    "KeyPool",
]

logger = get_logger("llmbatch.providers")

#: errors of one key that retire it from a :class:`KeyPool` (the others may still work)
RETIRES_KEY: tuple[type[LLMBatchError], ...] = (AuthenticationFailed, QuotaExhausted)

#: an item's final error (after its retries) that sends it to the next fallback: the
#: model was unavailable or unreachable, its context too short, or its filter refused
DEFAULT_FALLBACK_ON: tuple[type[LLMBatchError], ...] = (
    ProviderUnavailable,
    Timeout,
    ConnectionFailed,
    ContextLengthExceeded,
    ContentFiltered,
)

#: errors that make a route unusable for the whole job: with fallbacks, the job moves on
#: to the next route for every item still to answer
JOB_FALLBACK_ON: tuple[type[LLMBatchError], ...] = (
    AuthenticationFailed,
    QuotaExhausted,
    NotFound,
    ProviderUnreachable,
)


@dataclass(frozen=True, slots=True)
class Fallback:
    """Another route for an item: *model* on *provider* (``None``: the client's own).

    ``LLMClient(fallbacks=["gpt-4o", Fallback("claude-haiku-4-5", AnthropicProvider())])``;
    a plain string is a model of the client's provider. The response of an item answered
    there names the model and provider that answered (``Response.model``,
    ``Response.provider``), and is priced at that model's prices.
    """

    model: str
    provider: Provider | None = None

    @classmethod
    def of(cls, value: Fallback | str) -> Fallback:
        """*value* as a :class:`Fallback` (a string is a model of the same provider)."""
        if isinstance(value, Fallback):
            return value
        if isinstance(value, str) and value.strip():
            return cls(value.strip())
        raise TypeError(f"a fallback is a model name or a Fallback, not {value!r}")


class KeyPool(AsyncClosing):
    """Several providers of one service, one per API key, used as one provider.

    A key refused outright (:class:`~llmbatch.errors.AuthenticationFailed`) is retired
    for every model; a key out of quota (:class:`~llmbatch.errors.QuotaExhausted`,
    which Gemini counts per model) for that model only. :meth:`reinstate` gives them
    all another chance (``LLMClient.map`` does, at the start of each job).

    Args:
        members: the providers, one per key (at least one; all with the same ``name``).

    Raises:
        ValueError: no member, or members of different services.
    """

    def __init__(self, members: Sequence[Provider]) -> None:
        if not members:
            raise ValueError("a KeyPool needs at least one provider")
        names = {m.name for m in members}
        if len(names) != 1:
            raise ValueError(f"a KeyPool's keys belong to one provider, not {sorted(names)}")
        self.members: tuple[Provider, ...] = tuple(members)
        self.name: str = members[0].name
        digest = hashlib.sha256("|".join(m.quota_key for m in members).encode()).hexdigest()
        #: the pool as a whole (each member keeps its own quota_key and limiter)
        self.quota_key = f"pool-{digest[:12]}"
        #: (member index, model or None for every model) -> the error that retired it
        self._retired: dict[tuple[int, str | None], LLMBatchError] = {}
        endpoint = getattr(members[0], "endpoint", None)
        if isinstance(endpoint, str):
            self.endpoint = endpoint  # keys do not change answers: one cache key space
        has_batch = getattr(members[0], "has_batch_api", None)
        if isinstance(has_batch, bool):
            self.has_batch_api = has_batch

    def __repr__(self) -> str:
        return f"<KeyPool {self.name} {len(self.active)}/{len(self.members)} keys active>"

    @property
    def active(self) -> tuple[Provider, ...]:
        """The members not retired for every model."""
        return self.active_for(None)

    def active_for(self, model: str | None) -> tuple[Provider, ...]:
        """The members that may still answer *model*."""
        return tuple(
            m
            for i, m in enumerate(self.members)
            if (i, None) not in self._retired and (i, model) not in self._retired
        )

    @property
    def refunds_unused(self) -> bool:
        """As the members' rule (they are one service)."""
        return bool(getattr(self.members[0], "refunds_unused", False))

    def retire(self, member: Provider, error: LLMBatchError, model: str | None = None) -> None:
        """Leave *member* out because of *error* (said once): for every model when the
        key is refused, for *model* alone when its quota for it is spent."""
        index = self.members.index(member)
        scope = model if isinstance(error, QuotaExhausted) else None
        if (index, None) in self._retired or (index, scope) in self._retired:
            return
        self._retired[index, scope] = error
        logger.warning(
            "pool.key_retired",
            provider=self.name,
            quota=member.quota_key.split("@")[0],
            key_hint=error.key_hint,
            model=scope,
            reason=type(error).__name__,
            detail=error.message,
            keys_left=len(self.active_for(model)),
        )

    def reinstate(self) -> None:
        """Give every retired key another chance (a new job)."""
        self._retired.clear()

    def pick(self, room: Callable[[Provider], float], model: str | None = None) -> Provider:
        """The member with the most *room* among those that may answer *model* (ties:
        the first).

        Raises:
            LLMBatchError: none is left: the error that retired the last one (a
                :class:`~llmbatch.errors.FatalError`, which stops a job).
        """
        active = self.active_for(model)
        if not active:
            last = next(reversed(self._retired.values()))
            raise copy.copy(last)
        return max(active, key=room)

    def batch(self) -> Any:
        """The Batch API of the first key still active (batches belong to the account:
        polling after a restart goes through the same first key)."""
        member = (self.active or self.members)[0]
        backend = getattr(member, "batch", None)
        if backend is None:
            raise ValueError(f"the {self.name} provider has no Batch API")
        return backend()

    async def complete(self, request: Request) -> Response:
        """Answer with the first active member (an :class:`LLMClient` spreads requests
        over all of them by room; this is for direct use)."""
        return await self.pick(lambda _: 0.0).complete(request)

    def admission(self, request: Request, model: str) -> Admission:
        return self.members[0].admission(request, model)

    def settlement(self, request: Request, response: Response) -> Admission:
        return self.members[0].settlement(request, response)

    async def aclose(self) -> None:
        """Close every member."""
        for member in self.members:
            await member.aclose()
