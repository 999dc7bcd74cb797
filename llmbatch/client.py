"""``LLMClient``: the call path of one item, and many items through one client.

One call goes through a stack of small steps, outermost first::

    LLMClient.complete(request)
      _call_with_retry     the RetryPolicy (tenacity); every attempt goes back through
                           the limiter, so retries pay RPM/TPM like first attempts
      (attempt_hook)       around each attempt, only when set (llmbatch.metrics: spans)
      _call_with_limits    admission cost → limiter.acquire → provider.complete
                           → limiter.observe(headers) → permit.settle(usage);
                           a 429 puts the whole quota in cooldown (not a private sleep)
      provider.complete    the adapter: SDK call with max_retries=0, errors classified

:meth:`LLMClient.map` runs many requests through :func:`llmbatch.runner.run_batch`
(bounded, ordered, with the failure policy) or the Batch API, as :func:`llmbatch.routing.plan`
decides; :mod:`llmbatch.api` (``llmbatch.map``) does it in one call from a prompt
template and items.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import math
import string
from collections import OrderedDict
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, overload

from llmbatch._log import get_logger
from llmbatch.batchapi import Journal, batch_backend, run_batch_api
from llmbatch.cache import (
    CachePolicy,
    ResponseCache,
    SupportsClaim,
    SupportsRelease,
    open_cache,
)
from llmbatch.concurrency import SAFETY_CAP, InFlight, InFlightTarget
from llmbatch.config import (
    LimiterSettings,
    ModelProfile,
    limiter_settings,
    load_profiles,
    load_settings,
    profile_for,
)
from llmbatch.errors import (
    BudgetExhausted,
    ConnectionFailed,
    LLMBatchError,
    ProviderUnreachable,
    RateLimited,
    TransientError,
    redact,
)
from llmbatch.failure import (
    BatchResult,
    FailureStrategy,
    ItemError,
    OnError,
    finish,
)
from llmbatch.limits import (
    Limiter,
    LimiterStatistics,
    Limits,
    RateLimitHeaders,
    RedisRateLimiter,
    get_limiter,
    quota_name,
    request_burst,
    request_rate,
)
from llmbatch.models import Embedding, EmbeddingRequest, Request, Response, Usage
from llmbatch.providers.base import Admission, AsyncClosing, Provider, SupportsEmbeddings
from llmbatch.providers.pool import (
    DEFAULT_FALLBACK_ON,
    JOB_FALLBACK_ON,
    RETIRES_KEY,
    Fallback,
    KeyPool,
)
from llmbatch.retry import (
    RetryLog,
    RetryPolicy,
    stop_if_batch_aborted,
    timed,
    wait_retry_after,
)
from llmbatch.routing import Mode, Prefer, plan
from llmbatch.runner import aiterate, current_item, run_batch
from llmbatch.structured import FinishPolicy, InvalidOutput, decide
from llmbatch.tokens import check_context_window, prompt_token_bound

AnyRequest = Request | EmbeddingRequest
Answer = Response | Embedding
AnswerT = TypeVar("AnswerT", Response, Embedding)
RequestT = TypeVar("RequestT", Request, EmbeddingRequest)
#: ``hook(request, attempt)``: a context manager around one attempt; what it gives is
#: called once the attempt holds its permit (see ``LLMClient.attempt_hook``)
AttemptHook = Callable[[AnyRequest, int], AbstractContextManager[Callable[[], None]]]

__all__ = [
    "DEFAULT_MAX_REASKS",
    "DEFAULT_TIMEOUT",
    "USE_DEFAULT",
    "AttemptHook",
    "ClientStatistics",
    "LLMClient",
    "build_request",
    "template_fields",
    "watch_new_clients",
]


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """What a client has done so far."""

    succeeded: int
    failed: int
    attempts: int
    usage: Usage
    cost: float | None
    #: requests that reached the provider (attempts that got a permit and were sent)
    requests: int = 0
    #: requests in flight now, and the target they are held to (and why)
    in_flight: int = 0
    in_flight_target: InFlightTarget | None = None
    #: follow-up requests for structured answers that failed to parse or validate
    reasks: int = 0
    #: items that failed as InvalidOutput after every re-ask
    invalid: int = 0
    #: answers served from the response cache, and from an identical request of the job
    cache_hits: int = 0
    duplicates: int = 0
    #: what those answers cost when they were first paid for (USD)
    saved_cost: float = 0.0


#: called with every LLMClient made (see :func:`watch_new_clients`)
_WATCHERS: list[Callable[[LLMClient], None]] = []


def watch_new_clients(callback: Callable[[LLMClient], None]) -> Callable[[], None]:
    """Call *callback* with every :class:`LLMClient` made from now on, those that
    ``llmbatch.map`` and ``llmbatch run`` make inside included; returns the function
    that stops it. ``llmbatch.metrics`` uses it (``every_client=True``)."""
    _WATCHERS.append(callback)

    def stop() -> None:
        if callback in _WATCHERS:
            _WATCHERS.remove(callback)

    return stop


#: set when a fallback answered the current item (its answer is not cached as the
#: primary's; read by the caller of ``_answer`` in the same task)
_FELL_BACK: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "llmbatch_fell_back", default=False
)

#: the provider the current call goes to when it is not the client's own (a fallback's)
_ROUTE: contextvars.ContextVar[Provider | None] = contextvars.ContextVar(
    "llmbatch_route", default=None
)

logger = get_logger("llmbatch.client")

#: the output a request without ``max_tokens`` is budgeted for (OpenAI's reservation)
DEFAULT_MAX_OUTPUT = 4096

#: identical requests a client remembers the answers of, to send each once (in-job dedupe)
DEDUPE_MEMORY = 10_000

#: follow-up requests an invalid structured answer may get (``max_reasks``)
DEFAULT_MAX_REASKS = 2

#: the finish policy of plain-text requests: keep what came, as before there was one
_KEEP_ALL = FinishPolicy(length="keep", content_filter="keep", refusal="keep")

#: seconds one attempt may wait for the provider's answer when nothing else is set (the
#: SDKs wait 600 s: a hung request would hold a slot for ten minutes)
DEFAULT_TIMEOUT = 120.0


class _Unset:
    """The type of :data:`USE_DEFAULT`."""

    def __repr__(self) -> str:
        return "USE_DEFAULT"


#: "not given": take the configured default (as httpx's ``USE_CLIENT_DEFAULT``)
USE_DEFAULT = _Unset()


class _Reachability:
    """Tells a provider that is gone (or broken) from a few failed requests, so that
    the job stops with one clear error instead of failing every item after minutes of
    retries (the items stay pending: a rerun sends them).

    Two rules:

    * a failed *connection* (refused, DNS, TLS: :attr:`ConnectionFailed.connect`) says
      nothing about the item, only about the provider: ``MIN_FAILURES`` of them in a
      row across the client, no answer in between, over at least ``MIN_SECONDS`` (a
      blip of a second is ridden out), and the provider is unreachable;
    * an item whose every attempt failed transiently (timeouts, 5xx, resets; not
      rate limits), while not one request of the client was answered since its first
      attempt, failed because of the provider: the provider is unusable.
    """

    MIN_FAILURES = 5
    MIN_SECONDS = 2.0

    __slots__ = ("first", "last_answer", "streak")

    def __init__(self) -> None:
        self.streak = 0
        self.first = 0.0
        #: the loop time of the last answer (-inf: none yet)
        self.last_answer = -math.inf

    def answered(self, now: float) -> None:
        """A response arrived at *now*: the provider is there."""
        self.streak = 0
        self.last_answer = now

    def failed(self, now: float) -> bool:
        """A connection failed at *now*; whether the provider now counts as gone."""
        if self.streak == 0:
            self.first = now
        self.streak += 1
        return self.streak >= self.MIN_FAILURES and now - self.first >= self.MIN_SECONDS


def template_fields(template: str) -> list[str]:
    """The record fields a ``str.format`` prompt template names, in order, once each
    (``"{doc[title]}"`` names ``doc``).

    Raises:
        ValueError: the template is malformed (a stray ``{`` or ``}``, an unknown
            ``!`` conversion), has positional fields (``{}``, ``{0}``), which a record
            cannot fill, or reads attributes (``{text.upper}`` would put a method's
            repr, with its memory address, in the prompt). The message says how to
            write literal braces.
    """
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(
            f"the prompt template is malformed: {exc} (write {{{{ and }}}} for literal braces)"
        ) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        field = name.split(".")[0].split("[")[0]
        if "." in name:
            raise ValueError(
                f"the prompt template reads an attribute in {{{name}}}: name a field (or "
                "an item of a nested one, {doc[title]}), not an attribute"
            )
        if field == "" or field.isdigit():
            raise ValueError(
                f"the prompt template has a positional field {{{name}}}: name a field of "
                "the records instead, such as {text} (write {{ and }} for literal braces)"
            )
        if conversion not in (None, "r", "s", "a"):
            raise ValueError(
                f"the prompt template has an unknown conversion !{conversion} in {{{name}}}"
            )
        for nested in template_fields(spec or ""):
            if nested not in names:
                names.append(nested)
        if field not in names:
            names.append(field)
    return names


def build_request(
    template: str | Callable[[Any], Request | str],
    item: Any,
    *,
    system: str | None = None,
    **options: Any,
) -> Request:
    """The :class:`Request` for *item*: a ``str.format`` template over a dict item (or
    ``{item}`` for any other item), or a callable returning a Request or a prompt.

    Raises:
        ValueError: the prompt, or a field the template uses, is empty.
        KeyError: the template names a field the item does not have.
    """
    if callable(template):
        built = template(item)
        if isinstance(built, Request):
            return built
        return Request.from_prompt(built, system=system, **options)
    values = dict(item) if isinstance(item, Mapping) else {"item": item}
    for _, name, _, _ in string.Formatter().parse(template):
        field = (name or "").split(".")[0].split("[")[0]
        value = values.get(field) if field else None
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"the item's {field!r} is empty: nothing to send")
    prompt = template.format(**values)
    return Request.from_prompt(prompt, system=system, **options)


class _Feedback:
    """``with _Feedback("observe"): await limiter.observe(...)``: telling the limiter
    what happened (headers, a 429, the usage). A failure there (the shared limiter's
    server gone) is logged, never raised: the answer is paid for and kept."""

    __slots__ = ("step",)

    def __init__(self, step: str) -> None:
        self.step = step

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        if not isinstance(exc, Exception):
            return False  # none, or a cancellation: goes on
        logger.warning(
            "limits.feedback_failed",
            step=self.step,
            error_type=type(exc).__name__,
            error=redact(str(exc)),
        )
        return True


@dataclass(slots=True)
class _Finishing:
    """One item's answer while the finish policy and re-asks work on it: the request
    last sent and its answer, and what the follow-up requests used."""

    request: Request
    response: Response
    current: Request = field(init=False)
    first: Usage = field(init=False)
    extra: Usage = field(default_factory=Usage)
    reasks: int = 0
    grown: int = 0

    def __post_init__(self) -> None:
        self.current = self.request
        self.first = self.response.usage

    @property
    def usage(self) -> Usage:
        """What the item's calls used in all."""
        return self.first + self.extra


class LLMClient(AsyncClosing):
    """Calls a provider within its limits, with retries and a failure policy.

    Args:
        provider: the :class:`~llmbatch.providers.base.Provider` to call.
        model: the default model for requests that name none.
        max_tokens: the default output cap for requests that set none.
        limits: the quota's :class:`~llmbatch.limits.Limits` (default: the model's
            profile, see :mod:`llmbatch.config`); the limiter is shared by every client of
            the same provider, key and model in the event loop.
        limiter: a limiter to use instead (e.g. a ``RedisRateLimiter``).
        limiter_url: where quotas are kept: ``"memory"`` (this process) or a
            ``redis://`` URL shared by every process that names it, under the
            configured namespace (or a :class:`~llmbatch.config.LimiterSettings`);
            default: the configuration (``LLMBATCH_LIMITER_URL``, ``[limiter] url``;
            see :mod:`llmbatch.config`). The client closes the Redis connections it opens.
        retry: the :class:`~llmbatch.retry.RetryPolicy` (default: 6 attempts).
        on_error: the failure strategy of :meth:`map`.
        max_concurrency: requests in flight at most: a hard cap. Default: none; the
            number in flight follows the limits (the rate they allow times the
            measured latency, with a margin; see :mod:`llmbatch.concurrency`), within
            a safety cap of 2,048.
        sleep: how retries wait (injectable for tests).
        profiles: model profiles (default: built-ins overridden by ``llmbatch.toml``).
        max_cost: a budget in USD that is never exceeded: each call reserves what it
            may cost at most (its prompt's bytes as tokens, ``max_tokens`` of output,
            at the model's prices) while it runs, and a call that would not fit what is
            left raises :class:`~llmbatch.errors.BudgetExhausted` instead of starting
            (fatal: the batch stops, keeping what finished).
        timeout: seconds one attempt may wait for the provider's answer before it
            counts as a (retried) :class:`~llmbatch.errors.Timeout`; the wait for a
            rate-limit permit is not part of it. Default: the retry policy's
            ``attempt_timeout`` if it sets one, else the model profile's ``timeout``
            (``llmbatch.toml``), else :data:`DEFAULT_TIMEOUT` (120 s); ``None``: no
            limit of ours.
        max_reasks: for a request with a ``response_model``, how many follow-up
            requests an answer that fails to parse or validate may get (each quotes the
            errors; each is paced by the limiter and priced). What is still invalid
            after them is the item's :class:`~llmbatch.structured.InvalidOutput`
            (permanent), carrying the raw text and the errors. Default 2.
        finish_policy: what to do with an answer cut at ``max_tokens``, stopped by a
            content filter, or refused (:class:`~llmbatch.structured.FinishPolicy`:
            error, keep, or retry once with a larger ``max_tokens``). Default: error
            for requests with a ``response_model`` (a cut object is never valid), keep
            for plain text.
        cache: a response cache shared across jobs: ``"default"`` (a SQLite file in the
            user cache folder), a path, a ``redis://`` URL, or a
            :class:`~llmbatch.cache.ResponseCache` (left open by :meth:`aclose`: one
            cache object may serve many clients). An answer found there is served
            without a request (``Response.cached``, cost 0; what it cost first is in
            ``ClientStatistics.saved_cost``). Default: off (the CLI turns it on).
        cache_policy: how the cache is used (:class:`~llmbatch.cache.CachePolicy`:
            ``"read-write"``, ``"read-only"``, ``"refresh"``, ``ttl``; requests with a
            temperature above 0 are samples, cached only with ``cache_sampled``).
        dedupe: send identical requests of this client once (in flight together, or
            among its 10,000 most recent answers) and give every caller the answer.
            Requests that ask for samples (a temperature above 0, ``n`` > 1) are each
            sent. Off by default for a client; ``llmbatch.map`` and ``llmbatch run``
            turn it on for their one job.
        fallbacks: other routes, in order (:class:`~llmbatch.providers.pool.Fallback`,
            or a model name of this provider). An item whose final error is one of
            *fallback_on* is sent to the next route; a route that fails fatally for the
            whole job (:data:`~llmbatch.providers.pool.JOB_FALLBACK_ON`: a refused key,
            an exhausted quota, an unknown model, an unreachable server) is left, with
            one WARNING, for every item still to answer. The response names the model
            and provider that answered, and is priced at that model's prices.
        fallback_on: the item errors that go to the next fallback (default
            :data:`~llmbatch.providers.pool.DEFAULT_FALLBACK_ON`: unavailable or timed
            out after the retries, context too long, content filtered).

    The provider may be a :class:`~llmbatch.providers.pool.KeyPool` of several keys:
    each key keeps its own limiter, every request goes through the key with the most
    room, and a key the provider refuses is retired while the others go on.

    A fatal error (a refused key, an exhausted quota, the budget, a provider that
    cannot be reached) stops :meth:`map`: no new request starts, requests already at
    the provider finish and their answers are kept, and nothing else is marked failed.
    """

    def __init__(
        self,
        provider: Provider,
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        limits: Limits | None = None,
        limiter: Limiter | None = None,
        limiter_url: str | LimiterSettings | None = None,
        retry: RetryPolicy | None = None,
        on_error: OnError | str | FailureStrategy = OnError.FAIL_FAST,
        max_concurrency: int | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
        profiles: Mapping[str, ModelProfile] | None = None,
        max_cost: float | None = None,
        timeout: float | _Unset | None = USE_DEFAULT,
        max_reasks: int = DEFAULT_MAX_REASKS,
        finish_policy: FinishPolicy | None = None,
        cache: ResponseCache | str | None = None,
        cache_policy: CachePolicy | None = None,
        dedupe: bool = False,
        fallbacks: Sequence[Fallback | str] = (),
        fallback_on: tuple[type[LLMBatchError], ...] = DEFAULT_FALLBACK_ON,
    ) -> None:
        if max_reasks < 0:
            raise ValueError(f"max_reasks must be >= 0, not {max_reasks!r}")
        self.provider = provider
        self.fallbacks: tuple[Fallback, ...] = tuple(Fallback.of(f) for f in fallbacks)
        self.fallback_on = fallback_on
        #: routes (0: the primary, i: fallbacks[i - 1]) left for the whole job
        self._dead_routes: set[int] = set()
        #: the error that made the last route be left (raised once none is left)
        self._job_error: LLMBatchError | None = None
        self.max_reasks = max_reasks
        self.finish_policy = finish_policy
        self.cache = open_cache(cache)
        #: a cache opened here (from a name) is closed here; one passed in is the
        #: caller's, who may share it with the next client (a notebook's MemoryCache)
        self._owns_cache = self.cache is not None and self.cache is not cache
        self.cache_policy = cache_policy or CachePolicy()
        self.dedupe = dedupe
        # decided once, not per request: dedupe alone keys like a read-write cache (the
        # same rule for samples); the provider's server is part of every key
        key_policy = self.cache_policy
        if self.cache is None or (key_policy.mode == "off" and dedupe):
            key_policy = key_policy.copy(mode="read-write")
        self._key_policy = key_policy
        endpoint = getattr(provider, "endpoint", None)
        self._endpoint = endpoint if isinstance(endpoint, str) else None
        #: answers of the job's recent requests, by cache key (see ``dedupe``)
        self._memo: OrderedDict[str, Response] | None = OrderedDict() if dedupe else None
        self._pending: dict[str, asyncio.Future[Response | None]] = {}
        self._cache_writes: set[asyncio.Task[bool]] = set()
        self._cache_hits = 0
        self._duplicates = 0
        self._saved_cost = 0.0
        self.model = model
        self.max_tokens = max_tokens
        self.limits = limits
        self._limiter = limiter
        # An explicit URL replaces the configured one; the namespace stays configured.
        configured: dict[str, ModelProfile] | None = None
        if isinstance(limiter_url, LimiterSettings):
            settings = limiter_url
        elif profiles is None:
            configured, settings = load_settings(url=limiter_url)  # one read of the file
        else:
            settings = limiter_settings(url=limiter_url)
        self.limiter_settings: LimiterSettings = settings
        self._owned_limiters: list[tuple[asyncio.AbstractEventLoop, Limiter]] = []
        policy = retry or RetryPolicy()
        if isinstance(policy.wait, wait_retry_after):
            # A 429 is waited out by the shared limiter's cooldown, not per item.
            wait = policy.wait
            policy = policy.copy(
                wait=wait_retry_after(
                    wait.fallback, max_wait=wait.max_wait, ignore_rate_limits=True
                )
            )
        # A request let finish after an abort is not tried again.
        self.retry = policy.copy(stop=policy.stop | stop_if_batch_aborted())
        if isinstance(timeout, _Unset) and policy.attempt_timeout is not None:
            timeout = policy.attempt_timeout
        if isinstance(timeout, float | int) and not timeout > 0:
            raise ValueError(f"timeout must be positive seconds or None, not {timeout!r}")
        self._timeout = timeout
        self._reach = _Reachability()
        self._gate = InFlight(max_concurrency, name=f"{provider.name}/{model or ''}")
        #: mean admission cost per request, by unit (what turns token limits into a rate)
        self._mean_cost: dict[str, float] = {}
        self.on_error = on_error
        self.max_concurrency = max_concurrency
        self._sleep = sleep
        self.retry_log = RetryLog()
        #: called around every attempt when set (:func:`llmbatch.metrics.instrument`
        #: sets it, for spans and per-attempt figures); ``None``: nothing is called
        self.attempt_hook: AttemptHook | None = None
        if profiles is not None:
            self._profiles = dict(profiles)
        else:
            self._profiles = configured if configured is not None else load_profiles()
        self._limiters: dict[tuple[str, str, str], tuple[asyncio.AbstractEventLoop, Limiter]] = {}
        self.max_cost = max_cost
        self._succeeded = 0
        self._failed = 0
        self._reasks = 0
        self._invalid = 0
        self._usage = Usage()
        self._cost: float | None = None
        #: the most the calls in flight may still cost (see ``max_cost``)
        self._reserved = 0.0
        self._requests = 0
        #: seconds before the first status check of a Batch API batch (then backing off)
        self.batch_poll_interval = 15.0
        for watcher in tuple(_WATCHERS):
            try:
                watcher(self)
            except Exception as exc:  # a watcher's failure never stops a client
                logger.warning("client.watcher_failed", error=f"{type(exc).__name__}: {exc}")

    def __repr__(self) -> str:
        return f"<LLMClient {self.provider!r} model={self.model!r}>"

    async def aclose(self) -> None:
        """Close the provider (and the fallbacks'), the Redis connections of shared
        quotas, and the cache if the client opened it from a name (its pending writes
        land first either way; a cache object passed in stays open for its owner)."""
        try:
            await self.release()
        finally:
            await self.provider.aclose()
            for fallback in self.fallbacks:
                if fallback.provider is not None and fallback.provider is not self.provider:
                    await fallback.provider.aclose()

    async def release(self) -> None:
        """Close what the client opened in the running loop (the Redis connections of
        shared quotas, the cache it opened from a name, after the pending writes), not
        the provider, which the caller may share."""
        try:
            await self._close_limiters()
        finally:
            await self._close_cache()

    async def flush(self) -> None:
        """Wait until the answers being written to the cache (in the background) are
        stored."""
        if self._cache_writes:
            await asyncio.gather(*self._cache_writes, return_exceptions=True)

    async def _close_cache(self) -> None:
        await self.flush()
        cache: object = self.cache  # (a ResponseCache that may also SupportsRelease)
        if self.cache is not None and self._owns_cache:
            await self.cache.aclose()
        elif isinstance(cache, SupportsRelease):
            await cache.release()  # the owner's cache: its connections of this loop

    async def _close_limiters(self) -> None:
        """Close the shared-quota limiters this client opened in the running loop (their
        pending updates reach Redis first)."""
        loop = asyncio.get_running_loop()
        mine = [limiter for owner, limiter in self._owned_limiters if owner is loop]
        self._owned_limiters = [(o, lim) for o, lim in self._owned_limiters if o is not loop]
        self._limiters = {m: f for m, f in self._limiters.items() if f[0] is not loop}
        for limiter in mine:
            await limiter.aclose()

    def profile(self, model: str, provider: Provider | None = None) -> ModelProfile:
        """The profile (limits, prices) of *model* on *provider* (default: the one the
        current call goes to: this client's, or a fallback's)."""
        name = (provider or self._route()).name
        return profile_for(name, model, profiles=self._profiles)

    def _route(self) -> Provider:
        """The provider the current call goes to (a fallback's, within its call)."""
        return _ROUTE.get() or self.provider

    def limiter_for(self, model: str, provider: Provider | None = None) -> Limiter:
        """The limiter this client uses for *model* on *provider* (default: the
        current route; for a :class:`~llmbatch.providers.pool.KeyPool`, its first
        active key: each key has its own)."""
        if self._limiter is not None:
            return self._limiter
        provider = provider or self._route()
        if isinstance(provider, KeyPool):
            provider = (provider.active or provider.members)[0]
        # Looked up once per model, key and event loop, not on every attempt.
        loop = asyncio.get_running_loop()
        slot = (model, provider.name, provider.quota_key)
        found = self._limiters.get(slot)
        if found is None or found[0] is not loop:
            limiter: Limiter
            url = self.limiter_settings.url
            # explicit limits are the client's model's on the client's provider (each key
            # of a pool has them); a fallback's model or provider paces by its profile
            own = provider is self.provider or self._is_member(provider)
            limits = self.limits if own and self.model in (None, model) else None
            if url is not None:
                # The quota lives in Redis: every process naming it shares it.
                limiter = RedisRateLimiter.from_url(
                    url,
                    limits or self.profile(model, provider).limits,
                    quota=quota_name(provider.name, model, api_key=provider.quota_key),
                    namespace=self.limiter_settings.namespace,
                )
                self._owned_limiters.append((loop, limiter))
            else:
                limiter = get_limiter(
                    provider.name,
                    model,
                    api_key=provider.quota_key,
                    limits=limits,
                    default_limits=self.profile(model, provider).limits,
                )
            found = self._limiters[slot] = (loop, limiter)
        return found[1]

    def quota_statistics(self, model: str) -> LimiterStatistics:
        """The limiter statistics of *model*'s quota on the current route (what the
        live view shows): a key pool's keys added up (limits, levels, counts; the
        longest wait and cooldown)."""
        pool = self._route()
        if not isinstance(pool, KeyPool) or self._limiter is not None:
            return self.limiter_for(model).statistics()
        members = pool.active_for(model) or pool.members
        each = [self.limiter_for(model, member).statistics() for member in members]

        def added(name: str) -> dict[str, float]:
            total: dict[str, float] = {}
            for stats in each:
                for unit, value in getattr(stats, name).items():
                    total[unit] = total.get(unit, 0.0) + value
            return total

        caps = [s.concurrency_cap for s in each]
        return LimiterStatistics(
            acquired=sum(s.acquired for s in each),
            waiting=sum(s.waiting for s in each),
            in_flight=sum(s.in_flight for s in each),
            concurrency_cap=None if None in caps else sum(c or 0.0 for c in caps),
            waited_seconds=sum(s.waited_seconds for s in each),
            max_wait_seconds=max(s.max_wait_seconds for s in each),
            rate_limited=sum(s.rate_limited for s in each),
            cooldown_remaining=max(s.cooldown_remaining for s in each),
            header_corrections=sum(s.header_corrections for s in each),
            learned=tuple(sorted({d for s in each for d in s.learned})),
            available=added("available"),
            capacity=added("capacity"),
            others=added("others"),
            limits=added("limits"),
        )

    def _is_member(self, provider: Provider) -> bool:
        """Whether *provider* is one key of this client's own pool."""
        return isinstance(self.provider, KeyPool) and provider in self.provider.members

    def _room(self, model: str) -> Callable[[Provider], float]:
        """How much room a pool member's quota has for *model* now: the smallest
        share of a bucket left, less what already waits for it."""

        def room(member: Provider) -> float:
            stats = self.limiter_for(model, member).statistics()
            shares = [
                stats.available.get(unit, 0.0) / capacity
                for unit, capacity in stats.capacity.items()
                if capacity > 0
            ]
            return (min(shares) if shares else 1.0) - 0.01 * stats.waiting

        return room

    async def check_limiter(self, model: str | None = None) -> None:
        """Make sure the quota of *model* (default: the client's) can be used before
        sending anything: a shared limiter's server is reachable and accepts us.

        Raises:
            LimiterUnavailable: it cannot (fatal: no request may go without a permit).
        """
        model = model or self.model or ""
        if isinstance(self.provider, KeyPool):
            for member in self.provider.active:
                await self.limiter_for(model, member).check()
            return
        await self.limiter_for(model).check()

    def statistics(self) -> ClientStatistics:
        """Calls, attempts, tokens and money so far (cost ``None`` if prices are unknown)."""
        return ClientStatistics(
            succeeded=self._succeeded,
            failed=self._failed,
            attempts=self.retry_log.attempts,
            usage=self._usage,
            cost=self._cost,
            requests=self._requests,
            in_flight=self._gate.in_flight,
            in_flight_target=self._gate.target,
            reasks=self._reasks,
            invalid=self._invalid,
            cache_hits=self._cache_hits,
            duplicates=self._duplicates,
            saved_cost=self._saved_cost,
        )

    async def complete(self, request: Request | str) -> Response:
        """Answer one request (a :class:`Request` or a prompt) with limits and retries.

        Raises:
            LLMBatchError: the last error once the retry policy gives up, or at once for
                permanent and fatal errors.
        """
        if isinstance(request, str):
            request = Request.from_prompt(request)
        if self.cache is None and self._memo is None:
            return await self._answer(request)
        return await self._answer_once(self._with_defaults(request))

    def request_key(self, request: Request) -> str | None:
        """The key *request* is cached and deduplicated under, as :meth:`complete`
        would key it (the client's defaults filled in); ``None``: it is neither
        cached nor deduplicated (no cache and no dedupe, the policy leaves it out, or
        it has no stable form)."""
        if self.cache is None and self._memo is None:
            return None
        return self._cache_key(self._with_defaults(request))

    def _cache_key(self, request: Request) -> str | None:
        """The key *request* is cached and deduplicated under (``None``: neither)."""
        return self._key_policy.key_for(
            request, provider=self.provider.name, endpoint=self._endpoint
        )

    async def _answer_once(self, request: Request) -> Response:
        """:meth:`_answer` behind the response cache and the in-job dedupe: an answer
        known (the cache, a recent identical request) or coming (an identical request in
        flight) is served without a request."""
        key = self._cache_key(request)
        if key is None:
            return await self._answer(request)
        while (pending := self._pending.get(key)) is not None:
            first = await asyncio.shield(pending)
            if first is not None:
                return self._served(request, first, duplicate=True)
            # the first one failed: this one tries for itself
        served = await self._lookup(request, key)
        if served is not None:
            return served
        if key in self._pending or (self._memo is not None and key in self._memo):
            # an identical request started, or even finished, while this one looked
            return await self._answer_once(request)
        future: asyncio.Future[Response | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        response: Response | None = None
        claimed = False
        try:
            claimed, served = await self._claim(request, key)
            if served is not None:
                response = served
                return served
            _FELL_BACK.set(False)
            response = await self._answer(request)
        finally:
            del self._pending[key]
            future.set_result(response)
            if claimed and response is None:
                await self._unclaim(key)  # failed: the other processes may try
        self._remember(key, response, unclaim=claimed, persist=not _FELL_BACK.get())
        return response

    async def _claim(self, request: Request, key: str) -> tuple[bool, Response | None]:
        """With a cache shared across processes (Redis): claim answering *key*, or wait
        for the process that did to store its answer; ``(claimed, served)``. A claim
        lasts the client's timeout; a claimer that dies lets the others try once it
        runs out."""
        cache: object = self.cache  # (a ResponseCache that may also SupportsClaim)
        if not isinstance(cache, SupportsClaim) or not self.cache_policy.reads:
            return False, None
        seconds = self.timeout_for(request.model or "") or DEFAULT_TIMEOUT
        loop = asyncio.get_running_loop()
        give_up = loop.time() + seconds
        pause = 0.05
        while not await cache.claim(key, seconds=seconds):
            if loop.time() >= give_up:
                return False, None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
            served = await self._lookup(request, key)
            if served is not None:
                return False, served
        # Won the claim, but the answer may have been stored (and the claim given up)
        # between this caller's lookup and its claim: look once more before sending.
        served = await self._lookup(request, key)
        if served is not None:
            await cache.unclaim(key)
            return False, served
        return True, None

    async def _unclaim(self, key: str) -> None:
        cache: object = self.cache
        if isinstance(cache, SupportsClaim):
            await cache.unclaim(key)

    async def lookup(self, request: Request) -> Response | None:
        """The answer the cache (or this client's dedupe memory) holds for *request*,
        served as :meth:`complete` would serve it (``cached``, cost 0, counted), or
        ``None``: what a Batch API job checks before submitting."""
        request = self._with_defaults(request)
        key = self._cache_key(request)
        return None if key is None else await self._lookup(request, key)

    def store(self, request: Request, response: Response) -> None:
        """Keep *response* (answered elsewhere: a Batch API) for the identical
        requests to come, as :meth:`complete` keeps its answers."""
        if response.cached:
            return
        key = self._cache_key(self._with_defaults(request))
        if key is not None:
            self._remember(key, response)

    async def _lookup(self, request: Request, key: str) -> Response | None:
        """The answer the dedupe memory or the cache holds for *key*, served."""
        if self._memo is not None:
            recent = self._memo.get(key)
            if recent is not None:
                self._memo.move_to_end(key)
                return self._served(request, recent, duplicate=True)
        if self.cache is None or not self.cache_policy.reads:
            return None
        hit = await self.cache.get(key, max_age=self.cache_policy.ttl)
        if hit is None:
            return None
        try:
            return self._served(request, hit.response(), duplicate=False, cost=hit.cost)
        except InvalidOutput:
            return None  # stored under another version of the model: answered anew

    def _served(
        self,
        request: Request,
        answer: Response,
        *,
        duplicate: bool,
        cost: float | None = None,
    ) -> Response:
        """*answer* given to *request* without a request of its own (cost 0)."""
        parsed = answer.parsed
        schema = request.schema
        if schema is not None and parsed is None:
            parsed = schema.validate(answer.text)  # stored answers were valid: cheap
        saved = answer.cost if cost is None else cost
        self._succeeded += 1
        if duplicate:
            self._duplicates += 1
        else:
            self._cache_hits += 1
        self._saved_cost += saved or 0.0
        logger.debug("cache.served", key=request.key, duplicate=duplicate)
        return replace(answer, parsed=parsed, key=request.key, cost=0.0, attempts=0, cached=True)

    def _remember(
        self, key: str, response: Response, *, unclaim: bool = False, persist: bool = True
    ) -> None:
        """Keep *response* for the identical requests to come: in the dedupe memory, and
        in the cache (written in the background: it never delays the caller's own
        bookkeeping, such as a checkpoint write; :meth:`aclose` waits for it)."""
        if self._memo is not None:
            self._memo[key] = response
            if len(self._memo) > DEDUPE_MEMORY:
                self._memo.popitem(last=False)
        if self.cache is not None and ((self.cache_policy.writes and persist) or unclaim):
            task = asyncio.create_task(self._write(key, response, unclaim=unclaim, persist=persist))
            self._cache_writes.add(task)
            task.add_done_callback(self._cache_writes.discard)

    async def _write(
        self, key: str, response: Response, *, unclaim: bool, persist: bool = True
    ) -> bool:
        """Store *response*, then give up the claim on it (the waiters find it)."""
        assert self.cache is not None
        stored = False
        try:
            if self.cache_policy.writes and persist:
                stored = await self.cache.put(key, response, ttl=self.cache_policy.ttl)
        finally:
            if unclaim:
                await self._unclaim(key)
        return stored

    async def embed(self, request: EmbeddingRequest | str) -> Embedding:
        """Embed one text (an :class:`EmbeddingRequest` or a string) with limits and
        retries, like :meth:`complete`. The provider must have ``embed`` (OpenAI does).
        """
        if isinstance(request, str):
            request = EmbeddingRequest(input=request)
        self._embedder()
        return await self._answer(request)

    def _embedder(self, provider: Provider | None = None) -> SupportsEmbeddings:
        """The provider (default: this client's) as an embedder (its rate-limit rules
        take embeddings too); a pool's keys embed for it."""
        provider = provider or self.provider
        if isinstance(provider, KeyPool):
            provider = provider.members[0]
        if not isinstance(provider, SupportsEmbeddings):
            raise ValueError(f"the {provider.name} provider cannot embed")
        return provider

    def _admission(self, request: AnyRequest, model: str, provider: Provider) -> Admission:
        if isinstance(request, EmbeddingRequest):
            return self._embedder(provider).admission(request, model)
        return provider.admission(request, model)

    def _settlement(self, request: AnyRequest, response: Answer, provider: Provider) -> Admission:
        if isinstance(request, EmbeddingRequest):
            return self._embedder(provider).settlement(request, response)
        assert isinstance(response, Response)
        return provider.settlement(request, response)

    @overload
    async def _answer(self, request: Request) -> Response: ...
    @overload
    async def _answer(self, request: EmbeddingRequest) -> Embedding: ...
    async def _answer(self, request: AnyRequest) -> Answer:
        request = self._with_defaults(request)
        try:
            if not self.fallbacks or isinstance(request, EmbeddingRequest):
                return await self._answer_on(request)
            return await self._answer_with_fallbacks(request)
        except LLMBatchError as exc:
            self._failed += 1
            self._invalid += isinstance(exc, InvalidOutput)
            raise

    async def _answer_with_fallbacks(self, request: Request) -> Response:
        """:meth:`_answer_on` the primary, then on each fallback in turn while the
        item's error is one another route may not have (see ``fallbacks``)."""
        last: LLMBatchError | None = None
        for index, provider, routed in self._routes(request):
            token = _ROUTE.set(None if index == 0 else provider)
            try:
                response = await self._answer_on(routed)
                # another model's answer: not stored in the cache under this request's
                # key (the primary may answer it itself next time)
                _FELL_BACK.set(index > 0)
                return response
            except LLMBatchError as exc:
                if isinstance(exc, JOB_FALLBACK_ON):
                    self._leave_route(index, provider, routed.model, exc)
                elif index not in self._dead_routes and not isinstance(exc, self.fallback_on):
                    raise  # (an item of a route left meanwhile moves on, whatever its error)
                last = exc
                logger.info(
                    "fallback.next",
                    key=request.key,
                    provider=provider.name,
                    model=routed.model,
                    reason=type(exc).__name__,
                )
            finally:
                _ROUTE.reset(token)
        if last is None:  # every route was left before this item started
            assert self._job_error is not None
            last = copy.copy(self._job_error)
            last.item_key = request.key
        raise last

    def start_job(self) -> None:
        """Try every route and key again: what an earlier job left or retired (a
        refused key, an unreachable primary) may work now. :meth:`map` calls it."""
        self._dead_routes.clear()
        self._job_error = None
        for provider in (self.provider, *(f.provider for f in self.fallbacks)):
            if isinstance(provider, KeyPool):
                provider.reinstate()

    def _routes(self, request: Request) -> Iterator[tuple[int, Provider, Request]]:
        """The routes still open for *request*, in order: (index, provider, request)."""
        if 0 not in self._dead_routes:
            yield 0, self.provider, request
        for index, fallback in enumerate(self.fallbacks, start=1):
            if index not in self._dead_routes:
                yield (
                    index,
                    fallback.provider or self.provider,
                    replace(request, model=fallback.model),
                )

    def _leave_route(
        self, index: int, provider: Provider, model: str | None, exc: LLMBatchError
    ) -> None:
        """Leave a route for the rest of the job (said once)."""
        if index in self._dead_routes:
            return
        self._dead_routes.add(index)
        self._job_error = exc
        left = len(self.fallbacks) + 1 - len(self._dead_routes)
        logger.warning(
            "fallback.route_left",
            provider=provider.name,
            model=model,
            reason=type(exc).__name__,
            detail=exc.message,
            routes_left=left,
        )

    @overload
    async def _answer_on(self, request: Request) -> Response: ...
    @overload
    async def _answer_on(self, request: EmbeddingRequest) -> Embedding: ...
    async def _answer_on(self, request: AnyRequest) -> Answer:
        """Answer *request* on the current route: budget, context window, the call
        with its retries, then the finish policy and re-asks."""
        reserved = self._reserve_budget(request)
        try:
            if isinstance(request, Request):
                # A prompt that can never fit the model fails here, without a request.
                check_context_window(
                    request.messages,
                    max_tokens=request.max_tokens,
                    window=self.profile(request.model or "").context_window,
                    model=request.model or "",
                )
            response = await self._call_with_retry(request)
            if (
                isinstance(request, Request)
                and isinstance(response, Response)
                and (request.response_model is not None or self.finish_policy is not None)
            ):
                finished = _Finishing(request, response)
                try:
                    response = await self._finish(finished)
                except LLMBatchError as exc:
                    # paid for, though not kept
                    _spent(exc, finished.usage, self._charge(request, finished.usage))
                    raise
        except LLMBatchError as exc:
            exc.item_key = exc.item_key or request.key
            exc.provider = exc.provider or self._route().name
            raise
        finally:
            self._reserved -= reserved
        return self.account(request, response)

    async def _finish(self, state: _Finishing) -> Response:
        """The finish policy and, for a ``response_model``, validation and re-asks:
        the answer to keep (its usage and cost cover every follow-up request), or the
        item's permanent error."""
        schema = state.request.schema
        policy = self.finish_policy or (FinishPolicy() if schema is not None else _KEEP_ALL)
        window = self.profile(state.request.model or "").context_window
        while True:
            current, response = state.current, state.response
            decision = decide(
                response.finish_reason,
                response.refusal,
                policy,
                state.grown,
                max_tokens=current.max_tokens,
                max_tokens_limit=(
                    window - prompt_token_bound(current.messages) if window else None
                ),
            )
            if decision.verdict == "retry":
                logger.info(
                    "structured.retry_larger",
                    key=current.key,
                    reason=decision.reason,
                    max_tokens=decision.max_tokens,
                )
                state.grown += 1
                await self._follow_up(state, replace(current, max_tokens=decision.max_tokens))
                continue
            if decision.verdict == "error":
                raise decision.exception(
                    raw=response.text, model=current.model, attempt=response.attempts
                )
            if schema is None:
                return replace(response, usage=state.usage)
            try:
                parsed = schema.validate(response.text, attempts=state.reasks)
            except InvalidOutput as exc:
                if state.reasks >= self.max_reasks:
                    exc.model = current.model
                    raise
                state.reasks += 1
                self._reasks += 1
                logger.info(
                    "structured.reask",
                    key=current.key,
                    reask=state.reasks,
                    errors=exc.errors[:3],
                )
                messages = (*current.messages, *schema.reask_messages(response.text, exc.errors))
                await self._follow_up(state, replace(current, messages=messages))
                continue
            return replace(response, parsed=parsed, usage=state.usage, reasks=state.reasks)

    async def _follow_up(self, state: _Finishing, request: Request) -> None:
        """Send a follow-up request of the item (a re-ask, a larger ``max_tokens``):
        within the budget, through the limiter and the retry policy like any call."""
        reserved = self._reserve_budget(request)
        try:
            response = await self._call_with_retry(request)
        finally:
            self._reserved -= reserved
        assert isinstance(response, Response)
        state.current, state.response = request, response
        state.extra = state.extra + response.usage

    def _reserve_budget(self, request: AnyRequest) -> float:
        """Reserve the most *request* may cost against ``max_cost``; what was reserved.

        Raises:
            BudgetExhausted: it does not fit what is left (spent and reserved by the
                calls in flight counted).
        """
        if self.max_cost is None:
            return 0.0
        spent = (self._cost or 0.0) + self._reserved
        if isinstance(request, EmbeddingRequest):
            usage = Usage(input_tokens=len(request.input.encode()) + 1)
        else:
            output = (request.max_tokens or DEFAULT_MAX_OUTPUT) * request.n
            usage = Usage(input_tokens=prompt_token_bound(request.messages), output_tokens=output)
        bound = self.profile(request.model or "").cost(usage) or 0.0
        if spent + bound > self.max_cost + 1e-12:
            raise BudgetExhausted(
                f"the budget of ${self.max_cost:.4f} is spent or reserved (${spent:.4f}; "
                f"this call may cost up to ${bound:.4f}): raise max_cost to continue",
                provider=self.provider.name,
                model=request.model,
                item_key=request.key,
            )
        self._reserved += bound
        return bound

    @overload
    def _with_defaults(self, request: Request) -> Request: ...
    @overload
    def _with_defaults(self, request: EmbeddingRequest) -> EmbeddingRequest: ...
    def _with_defaults(self, request: AnyRequest) -> AnyRequest:
        changes: dict[str, Any] = {}
        if request.model is None:
            if self.model is None:
                raise ValueError("no model: pass model= to the client or the request")
            changes["model"] = self.model
        if (
            isinstance(request, Request)
            and request.max_tokens is None
            and self.max_tokens is not None
        ):
            changes["max_tokens"] = self.max_tokens
        if request.key is None:
            item = current_item()
            if item is not None and item.key is not None:
                changes["key"] = item.key
        return replace(request, **changes) if changes else request

    async def _call_with_retry(self, request: AnyRequest) -> Answer:
        attempts = 0
        started = asyncio.get_running_loop().time()

        def on_attempt(number: int) -> None:
            nonlocal attempts
            attempts = number
            item = current_item()
            if item is not None:
                item.attempts = number

        try:
            response = await self.retry.call(
                lambda: (
                    self._call_with_limits(request)
                    if self.attempt_hook is None
                    else self._call_observed(self.attempt_hook, request, attempts)
                ),
                sleep=self._sleep,
                log=self.retry_log,
                on_attempt=on_attempt,
                # only the provider's answer is timed (_send), not the wait for a permit
                time_attempts=False,
            )
        except LLMBatchError as exc:
            exc.item_key = exc.item_key or request.key
            exc.attempt = attempts
            if (
                isinstance(exc, TransientError)
                and not isinstance(exc, RateLimited)
                and attempts >= 2
                and self._reach.last_answer < started
            ):
                # Every attempt of this item failed and nothing at all was answered
                # meanwhile: the provider is gone or broken, not this item.
                raise self._unreachable(exc) from exc
            raise
        return replace(response, attempts=attempts)

    async def _call_observed(self, hook: AttemptHook, request: AnyRequest, attempt: int) -> Answer:
        with hook(request, attempt) as admitted:
            return await self._call_with_limits(request, admitted)

    async def _call_with_limits(
        self, request: AnyRequest, admitted: Callable[[], None] | None = None
    ) -> Answer:
        model = request.model or ""
        item = current_item()
        if item is not None and item.stopping:
            # The batch was aborted after an earlier call of this item was answered
            # (a flow making several calls per item): start nothing new.
            raise asyncio.CancelledError("the batch was aborted")
        route = self._route()
        pool = route if isinstance(route, KeyPool) else None
        while True:
            member = route if pool is None else pool.pick(self._room(model), model)
            try:
                answer = await self._call_member(request, model, member, item, admitted, pool)
            except RETIRES_KEY as exc:
                if pool is None:
                    raise
                pool.retire(member, exc, model)
                if not pool.active_for(model):
                    raise  # no key left: the job stops
                continue  # another key answers the item (the refused call cost nothing)
            if answer is not None:
                return answer
            # the key was retired while this call waited for its permit: another key

    async def _call_member(
        self,
        request: AnyRequest,
        model: str,
        provider: Provider,
        item: Any,
        admitted: Callable[[], None] | None,
        pool: KeyPool | None = None,
    ) -> Answer | None:
        """One call to *provider* (one key of *pool*, if any) under its limiter;
        ``None`` when that key was retired while the call waited for its permit."""
        limiter = self.limiter_for(model, provider)
        cost = self._admission(request, model, provider)
        mean = self._mean_cost
        for unit, amount in cost.items():
            mean[unit] = amount if unit not in mean else mean[unit] + 0.05 * (amount - mean[unit])
        gate = self._gate
        if not gate.sized and gate.cap is None:
            # sized from the limits before the first request (then from its latencies)
            self._size_in_flight(model, limiter)
        async with gate:
            permit = await limiter.acquire(**cost)
            if pool is not None and provider not in pool.active_for(model):
                permit.release()
                return None
            if admitted is not None:
                admitted()
            self._requests += 1
            if item is not None:
                item.request_sent()  # from here an abort lets the request finish
            loop = asyncio.get_running_loop()
            sent = loop.time()
            try:
                response: Answer = await self._send(request, provider)
            except BaseException as exc:
                if item is not None:
                    item.request_failed()
                if isinstance(exc, RateLimited):
                    dimension = {"requests": "rpm", "tokens": "tpm"}.get(exc.kind or "")
                    if exc.limit is not None and dimension is not None:
                        # the 429 names the limit (no header does): adopted like one
                        with _Feedback("observe"):
                            await limiter.observe(
                                RateLimitHeaders(limits={dimension: int(exc.limit)})
                            )
                    with _Feedback("on_rate_limited"):
                        await limiter.on_rate_limited(exc.retry_after, dimension=dimension)
                elif isinstance(exc, ConnectionFailed) and exc.connect:
                    self._check_reachable(exc)
                raise
            finally:
                permit.release()
            gate.observe(loop.time() - sent)
        self._reach.answered(loop.time())
        if gate.cap is None and gate.due():
            self._size_in_flight(model, limiter)
        if response.headers:
            with _Feedback("observe"):
                await limiter.observe(response.headers, permit)
        actual = self._settlement(request, response, provider)
        with _Feedback("settle"):
            permit.settle(
                tokens=actual.get("tokens"),
                input_tokens=actual.get("input_tokens"),
                output_tokens=actual.get("output_tokens"),
                refund=getattr(provider, "refunds_unused", False),
            )
        return response

    def _size_in_flight(self, model: str, limiter: Limiter) -> None:
        """Size the in-flight target from what the limiter's limits allow now (a key
        pool's: every key's limits added up, :meth:`quota_statistics`)."""
        pooled = isinstance(self._route(), KeyPool)
        stats = self.quota_statistics(model) if pooled else limiter.statistics()
        self._gate.resize(
            request_rate(stats.limits, self._mean_cost),
            request_burst(stats.capacity, self._mean_cost),
        )

    def _check_reachable(self, exc: ConnectionFailed) -> None:
        """Count a failed connection; raise :class:`ProviderUnreachable` (fatal) once
        they make a streak with no answer in between (see :class:`_Reachability`)."""
        if self._reach.failed(asyncio.get_running_loop().time()):
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: TransientError) -> ProviderUnreachable:
        if isinstance(exc, ConnectionFailed) and exc.connect:
            what = (
                f"cannot reach the provider ({self.provider!r}): {self._reach.streak} "
                "connections failed in a row with no answer in between"
            )
        else:
            what = (
                f"the provider ({self.provider!r}) answered nothing but errors: every "
                f"attempt of an item failed and no request was answered meanwhile"
            )
        return ProviderUnreachable(
            f"{what} (last: {type(exc).__name__}: {exc.message}). Stopping: requests "
            "not answered stay pending; rerun once the server works again",
            provider=exc.provider,
            model=exc.model,
            item_key=exc.item_key,
            key_hint=exc.key_hint,
        )

    @property
    def timeout(self) -> float | None:
        """Seconds one attempt may wait for the answer of the client's model."""
        return self.timeout_for(self.model or "")

    def timeout_for(self, model: str) -> float | None:
        """Seconds one attempt may wait for *model*'s answer: the client's ``timeout``,
        else the retry policy's ``attempt_timeout``, else the model profile's
        ``timeout``, else :data:`DEFAULT_TIMEOUT` (``None``: no limit of ours)."""
        if not isinstance(self._timeout, _Unset):
            return self._timeout
        configured = self.profile(model).timeout
        return configured if configured is not None else DEFAULT_TIMEOUT

    async def _send(self, request: AnyRequest, provider: Provider) -> Answer:
        """One call to *provider*, within :meth:`timeout_for` its model."""
        call: Awaitable[Answer] = (
            self._embedder(provider).embed(request)
            if isinstance(request, EmbeddingRequest)
            else provider.complete(request)
        )
        answer: Answer = await timed(
            call,
            self.timeout_for(request.model or ""),
            provider=provider.name,
            model=request.model,
        )
        return answer

    async def map(
        self,
        requests: Iterable[Request] | AsyncIterable[Request],
        *,
        on_error: OnError | str | FailureStrategy | None = None,
        max_concurrency: int | None = None,
        mode: Mode = "online",
        deadline: float | None = None,
        prefer: Prefer | None = None,
        journal: Journal | None = None,
    ) -> BatchResult[Response]:
        """Answer many requests, in input order, under the failure policy.

        Args:
            requests: the requests (their ``key`` names them in errors and batches).
            on_error: the failure strategy (default: the client's).
            max_concurrency: requests in flight at most (online).
            mode: ``"online"``, ``"batch"`` (the provider's Batch API: half price,
                answers within 24 h) or ``"auto"`` (see :mod:`llmbatch.routing`).
            deadline: seconds within which the answers are needed (for ``"auto"``).
            prefer: ``"cost"`` or ``"speed"`` (for ``"auto"``).
            journal: where batch ids are recorded so that a rerun resumes polling
                (a :class:`~llmbatch.store.Store`); batch mode only.

        Each call is a new job: routes left and keys retired by an earlier one are
        tried again. Fallbacks apply online; through a Batch API the primary answers.
        """
        self.start_job()
        return await self._map(
            self.complete,
            requests,
            on_error=on_error,
            max_concurrency=max_concurrency,
            mode=mode,
            deadline=deadline,
            prefer=prefer,
            journal=journal,
        )

    async def embed_many(
        self,
        requests: Iterable[EmbeddingRequest | str] | AsyncIterable[EmbeddingRequest | str],
        *,
        on_error: OnError | str | FailureStrategy | None = None,
        max_concurrency: int | None = None,
        mode: Mode = "online",
        deadline: float | None = None,
        prefer: Prefer | None = None,
        journal: Journal | None = None,
    ) -> BatchResult[Embedding]:
        """Embed many texts, in input order: :meth:`map` for embeddings, online or
        through the Batch API (same arguments)."""

        async def as_requests() -> AsyncIterator[EmbeddingRequest]:
            async for item in aiterate(requests):
                yield EmbeddingRequest(input=item) if isinstance(item, str) else item

        return await self._map(
            self.embed,
            as_requests(),
            on_error=on_error,
            max_concurrency=max_concurrency,
            mode=mode,
            deadline=deadline,
            prefer=prefer,
            journal=journal,
        )

    async def _map(
        self,
        answer: Callable[[RequestT], Awaitable[AnswerT]],
        requests: Iterable[RequestT] | AsyncIterable[RequestT],
        *,
        on_error: OnError | str | FailureStrategy | None,
        max_concurrency: int | None,
        mode: Mode,
        deadline: float | None,
        prefer: Prefer | None,
        journal: Journal | None,
    ) -> BatchResult[AnswerT]:
        strategy = on_error or self.on_error
        if mode != "online":
            listed = [r async for r in aiterate(requests)]
            model = next((r.model for r in listed if r.model), None) or self.model or ""
            route = plan(
                mode,
                listed,
                provider=self.provider,
                profile=self.profile(model),
                default_max_tokens=self.max_tokens,
                model=model,
                deadline=deadline,
                prefer=prefer,
            )
            if route.mode == "batch":
                return await self._map_batch(listed, strategy, journal)
            requests = listed
        return await run_batch(
            answer,
            requests,
            max_concurrency=max_concurrency or self.max_concurrency or SAFETY_CAP,
            on_error=strategy,
            key=_request_key,
        )

    async def _map_batch(
        self,
        requests: list[RequestT],
        on_error: OnError | str | FailureStrategy,
        journal: Journal | None,
    ) -> BatchResult[Any]:
        """:meth:`map` through the provider's Batch API, with the same result objects."""
        backend = batch_backend(self.provider)
        if backend is None:
            raise ValueError(f"the {self.provider.name} provider has no Batch API")
        keyed: list[tuple[str, AnyRequest]] = []
        served: dict[str, Answer | LLMBatchError] = {}
        for index, request in enumerate(requests):
            ready = self._with_defaults(request)
            name = ready.key or f"item-{index}"
            keyed.append((name, ready))
            if isinstance(ready, Request) and (hit := await self.lookup(ready)) is not None:
                served[name] = hit  # in the cache: not sent again
        outcomes = await run_batch_api(
            backend,
            [(name, request) for name, request in keyed if name not in served],
            journal=journal,
            poll_interval=self.batch_poll_interval,
            sleep=self._sleep,
        )
        return await self.batch_result(keyed, {**outcomes, **served}, on_error)

    async def batch_result(
        self,
        keyed: Sequence[tuple[str, AnyRequest]],
        outcomes: Mapping[str, Answer | LLMBatchError],
        on_error: OnError | str | FailureStrategy,
    ) -> BatchResult[Any]:
        """Batch API outcomes as a :class:`BatchResult` in input order, priced at the
        batch discount, finished like online answers (:meth:`finish`: typed answers
        validated, invalid ones re-asked online), under the failure strategy
        (fail-fast raises :class:`~llmbatch.failure.BatchFailed` carrying everything)."""
        results: list[Answer | ItemError] = []
        for index, (key, request) in enumerate(keyed):
            outcome = outcomes[key]
            try:
                if isinstance(outcome, LLMBatchError):
                    raise outcome
                if isinstance(outcome, Response) and outcome.cached:
                    results.append(outcome)  # served from the cache: counted there
                elif isinstance(request, Request) and isinstance(outcome, Response):
                    answer = await self.finish(request, outcome, batch=True)
                    self.store(request, answer)
                    results.append(answer)
                else:
                    results.append(self.account(request, outcome, batch=True))
            except LLMBatchError as exc:
                if exc is outcome:
                    self._failed += 1
                exc.item_key = exc.item_key or request.key
                results.append(ItemError.from_exception(index, exc, key=request.key))
        return finish(results, on_error)

    async def finish(
        self, request: Request, response: Response, *, batch: bool = False
    ) -> Response:
        """Finish an answer obtained outside :meth:`complete` (a Batch API's result):
        the finish policy and, for a ``response_model``, validation into ``parsed``
        with re-asks (sent online, through the limiter); the answer is accounted (at
        the batch discount when *batch*; follow-ups at the online price).

        Raises:
            InvalidOutput: still invalid after ``max_reasks`` follow-ups.
            ContentFiltered: refused or filtered, and the policy says error.
        """
        request = self._with_defaults(request)
        if request.response_model is None and self.finish_policy is None:
            return self.account(request, response, batch=batch)
        state = _Finishing(request, response)
        try:
            final = await self._finish(state)
        except LLMBatchError as exc:
            self._failed += 1
            self._invalid += isinstance(exc, InvalidOutput)
            costs = [
                self._charge(request, state.first, batch=batch),
                self._charge(request, state.extra),
            ]
            _spent(exc, state.usage, None if None in costs else sum(c or 0.0 for c in costs))
            exc.item_key = exc.item_key or request.key
            exc.provider = exc.provider or self.provider.name
            raise
        costs = [
            self._charge(request, state.first, batch=batch),
            self._charge(request, state.extra),
        ]
        self._succeeded += 1
        cost = None if None in costs else sum(c for c in costs if c is not None)
        return replace(final, cost=cost, key=final.key or request.key)

    @overload
    def account(
        self, request: AnyRequest, response: Response, *, batch: bool = False
    ) -> Response: ...
    @overload
    def account(
        self, request: AnyRequest, response: Embedding, *, batch: bool = False
    ) -> Embedding: ...
    def account(self, request: AnyRequest, response: Answer, *, batch: bool = False) -> Answer:
        """Count *response* in the statistics and price it (at the batch discount if
        it came through a Batch API)."""
        cost = self._charge(request, response.usage, batch=batch)
        self._succeeded += 1
        if isinstance(response, Response):
            provider = response.provider or self._route().name
            return replace(response, cost=cost, key=response.key or request.key, provider=provider)
        return replace(response, cost=cost, key=response.key or request.key)

    def _charge(self, request: AnyRequest, usage: Usage, *, batch: bool = False) -> float | None:
        """Count *usage* in the statistics and the budget; its price (``None``: unknown)."""
        cost = self.profile(request.model or "").cost(usage, batch=batch)
        self._usage = self._usage + usage
        if cost is not None:
            self._cost = (self._cost or 0.0) + cost
        return cost


def _spent(exc: LLMBatchError, usage: Usage, cost: float | None) -> None:
    """Record on an item's InvalidOutput what its calls used and cost."""
    if isinstance(exc, InvalidOutput):
        exc.input_tokens, exc.output_tokens = usage.input_tokens, usage.output_tokens
        exc.cost = cost


def _request_key(request: AnyRequest) -> str | None:
    return request.key
