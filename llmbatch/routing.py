"""Online or through the Batch API: the choice behind ``mode="online" | "batch" | "auto"``.

``auto`` takes the Batch API (half price, its own quota, answers within 24 hours) when
all of these hold, and says why in a ``routing.choice`` log event with the expected
saving:

* the provider has a Batch API (OpenAI, Anthropic, Azure, and the OpenAI-compatible
  servers whose provider profile says so: Groq, Together, Fireworks; not the local model,
  nor a server without such a profile: see :func:`has_batch_api`);
* the job is large enough to be worth the wait: at least the model profile's
  ``batch_min_items`` (default 100, settable in ``llmbatch.toml``);
* the caller accepts the latency: ``prefer="cost"``, or a ``deadline`` (seconds) at
  least as long as the batch window (24 hours).

Otherwise, and always with ``prefer="speed"``, the job goes online.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from llmbatch._log import get_logger
from llmbatch.batchapi import SupportsBatch
from llmbatch.config import ModelProfile
from llmbatch.models import EmbeddingRequest, Request, Usage
from llmbatch.tokens import TokenCounter

__all__ = [
    "BATCH_WINDOW",
    "MODES",
    "Mode",
    "Prefer",
    "Route",
    "choose_route",
    "estimated_usage",
    "has_batch_api",
    "plan",
]

#: how a job reaches the model
Mode = Literal["online", "batch", "auto"]
#: what ``mode="auto"`` favours
Prefer = Literal["cost", "speed"]

logger = get_logger("llmbatch.routing")

#: the providers' batch completion window, in seconds
BATCH_WINDOW = 24 * 3600.0
MODES = ("online", "batch", "auto")


@dataclass(frozen=True, slots=True)
class Route:
    """The chosen path and why.

    Attributes:
        mode: ``"online"`` or ``"batch"``.
        reason: a sentence saying why.
        cost_online: the job's estimated cost online (USD; ``None`` if prices unknown).
        cost_batch: the same through the Batch API.
    """

    mode: Literal["online", "batch"]
    reason: str
    cost_online: float | None = None
    cost_batch: float | None = None

    @property
    def saving(self) -> float | None:
        """What the Batch API saves over online (USD), when prices are known."""
        if self.cost_online is None or self.cost_batch is None:
            return None
        return self.cost_online - self.cost_batch


def has_batch_api(provider: object) -> bool:
    """Whether *provider* has a Batch API path: a ``batch()`` method, unless it says it
    has none (``has_batch_api`` false: an OpenAI-compatible server whose provider
    profile offers no ``/files`` + ``/batches``)."""
    return isinstance(provider, SupportsBatch) and getattr(provider, "has_batch_api", True)


def choose_route(
    mode: str,
    *,
    provider: Any,
    profile: ModelProfile,
    items: int,
    usage: Usage | None = None,
    deadline: float | None = None,
    prefer: str | None = None,
) -> Route:
    """Choose online or batch for a job of *items* requests (see the module docstring).

    Args:
        mode: ``"online"``, ``"batch"`` or ``"auto"``.
        provider: the provider (``batch()`` says whether it has a Batch API).
        profile: the model's profile (prices, discount, ``batch_min_items``).
        items: how many requests the job will send.
        usage: the job's estimated tokens, for the cost comparison.
        deadline: seconds within which the caller needs the answers.
        prefer: ``"cost"`` or ``"speed"``.

    Raises:
        ValueError: an unknown mode or preference, or ``"batch"`` for a provider
            without a Batch API.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if prefer not in (None, "cost", "speed"):
        raise ValueError(f"prefer must be 'cost' or 'speed', not {prefer!r}")
    has_batch = has_batch_api(provider)
    name = getattr(provider, "name", type(provider).__name__)
    online = batch = None
    if usage is not None:
        online = profile.cost(usage)
        batch = profile.cost(usage, batch=True)
    if mode == "batch" and not has_batch:
        raise ValueError(f"the {name} provider has no Batch API: use mode='online'")
    if mode == "online":
        route = Route("online", "online was asked for", online, batch)
    elif mode == "batch":
        route = Route("batch", "the Batch API was asked for", online, batch)
    elif not has_batch:
        route = Route("online", f"the {name} provider has no Batch API", online, batch)
    elif prefer == "speed":
        route = Route("online", "speed is preferred over cost", online, batch)
    elif items < profile.batch_min_items:
        route = Route(
            "online",
            f"{items} requests are fewer than the {profile.batch_min_items} that make a batch "
            "worth its wait (batch_min_items)",
            online,
            batch,
        )
    elif prefer == "cost":
        route = Route("batch", "cost is preferred over speed", online, batch)
    elif deadline is not None and deadline >= BATCH_WINDOW:
        route = Route("batch", "the deadline leaves room for the 24 h batch window", online, batch)
    else:
        route = Route(
            "online",
            "the Batch API may take up to 24 h: pass prefer='cost' or a deadline of at "
            "least 24 h to use it",
            online,
            batch,
        )
    logger.info(
        "routing.choice",
        mode=route.mode,
        reason=route.reason,
        items=items,
        cost_online=online,
        cost_batch=batch,
        saving=route.saving,
    )
    return route


def estimated_usage(
    requests: Sequence[Request | EmbeddingRequest],
    default_max_tokens: int | None,
    *,
    model: str | None = None,
) -> Usage:
    """A job's tokens, the one estimate behind every cost figure (the route's
    comparison, a batch's budget bound, ``llmbatch estimate``): prompts counted with
    the model's tokenizer (:class:`~llmbatch.tokens.TokenCounter`, offline; approximate
    for models tiktoken does not know), the response model's schema in each request
    that has one, output at the cap (``max_tokens`` x ``n``)."""
    prompt = output = 0
    counters: dict[str, TokenCounter] = {}
    schemas: dict[tuple[str, str], int] = {}
    for request in requests:
        name = request.model or model or ""
        counter = counters.get(name)
        if counter is None:
            counter = counters[name] = TokenCounter.for_model(name)
        if isinstance(request, EmbeddingRequest):
            prompt += counter.count(request.input)
            continue
        prompt += counter.count_messages(request.messages)
        output += (request.max_tokens or default_max_tokens or 0) * request.n
        schema = request.schema
        if schema is not None:
            # the schema travels with every request (response_format, or a forced tool)
            found = (name, schema.fingerprint)
            if found not in schemas:
                sent = json.dumps(schema.openai_response_format(), separators=(",", ":"))
                schemas[found] = counter.count(sent)
            prompt += schemas[found]
    return Usage(input_tokens=prompt, output_tokens=output)


def plan(
    mode: str,
    requests: Sequence[Request | EmbeddingRequest],
    *,
    provider: Any,
    profile: ModelProfile,
    default_max_tokens: int | None = None,
    model: str | None = None,
    deadline: float | None = None,
    prefer: str | None = None,
) -> Route:
    """The route of a job of *requests*: the one place where "online or batch?" is
    decided, for :meth:`LLMClient.map <llmbatch.client.LLMClient.map>`,
    :func:`llmbatch.map` and :func:`llmbatch.job.run_job` alike (see
    :func:`choose_route`; the cost comparison uses :func:`estimated_usage`, counting
    with *model*'s tokenizer where a request names no model)."""
    return choose_route(
        mode,
        provider=provider,
        profile=profile,
        items=len(requests),
        usage=estimated_usage(requests, default_max_tokens, model=model),
        deadline=deadline,
        prefer=prefer,
    )
