"""One quota shared by many processes and hosts, through Redis.

:class:`RedisRateLimiter` implements the :class:`~llmbatch.limits.Limiter` contract
(``acquire`` → :class:`~llmbatch.limits.Permit`, ``settle``, ``release``, ``observe``,
``on_rate_limited``, ``statistics``, ``async with``), with the buckets stored in Redis:

* every bucket operation is one atomic Lua script (``lua/*.lua`` beside this module),
  and the clock is the Redis server's ``TIME``, never a client's, so hosts with skewed
  clocks still agree;
* all dimensions (RPM, TPM, …) are checked and taken together in that script: a request
  never holds one bucket while waiting for another;
* every permit is a lease that expires (``lease_seconds``), recorded with what it counts
  as outstanding: the concurrency gate counts the leases, and a killed worker's permits
  stop counting (as in flight, and in the outstanding amounts header lifts and learned
  buckets allow for) once their leases expire;
* a waiter cancelled while its acquire is on its way to Redis or back takes nothing:
  whatever the script took is given back once its reply arrives;
* ``Limits.auto()`` works across processes: a limit learned from one process's response
  headers is stored with the quota, and every process adopts it before its next request
  is admitted (so that request is charged for it); until one is known, the AIMD
  concurrency cap is shared too;
* keys are namespaced (``llmbatch:{namespace}:{quota}``); every script that writes them
  sets their expiry, so they go a day after their last use.

Waiting is by polling: a refused acquire learns from the script how long until it fits
and sleeps that long (plus a little jitter so that processes do not stampede). Within a
process only the first waiter polls (the others queue behind it, in order), so a process
needs one Redis connection however many items it runs; across processes, waiters are
served roughly, not strictly, in arrival order.

A Redis server that cannot be used (unreachable, refusing the password, failing a
script) while a permit is asked for raises :class:`~llmbatch.errors.LimiterUnavailable`,
a fatal error that stops the job: no request is sent without its permit. Call
:meth:`RedisRateLimiter.check` before the first request to find out at once. The
feedback after an answer (``observe``, ``on_rate_limited``) raises redis-py's own
errors, which :class:`~llmbatch.client.LLMClient` logs and passes over: the answer is
paid for and kept. ``release`` and ``settle`` are queued as background updates (a
failure among them is logged once; :meth:`RedisRateLimiter.aclose` waits for them).

Build one from configuration with :meth:`RedisRateLimiter.from_url` (``LLMClient`` does
so when ``LLMBATCH_LIMITER_URL`` or ``[limiter] url`` names a ``redis://`` server; see
:mod:`llmbatch.config`). Requires the ``redis`` extra: ``pip install 'llmbatch[redis]'``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import uuid
from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple

from llmbatch._log import get_logger
from llmbatch.errors import LimiterUnavailable, RequestTooLarge, redact
from llmbatch.limits._config import (
    AIMD_CEILING,
    AIMD_START,
    DIMENSIONS,
    MINUTE_DIMENSIONS,
    UNITS,
    Limits,
)
from llmbatch.limits._contract import Limiter, LimiterStatistics, Permit
from llmbatch.limits._headers import RateLimitHeaders
from llmbatch.limits._permit import BucketPermit, plausible_limit, send_lag

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisRateLimiter"]

logger = get_logger("llmbatch.limits")

#: where a limiter URL comes from, for error messages
_WHERE_CONFIGURED = "--limiter-url, LLMBATCH_LIMITER_URL, [limiter] url"

#: seconds to wait for a connection to Redis (redis-py before 6 waits as long as the OS
#: does, minutes for a host that drops packets); a ``socket_connect_timeout`` in the URL
#: wins
_CONNECT_TIMEOUT = 5.0

#: the Lua scripts (``lua/<name>.lua``), each after the shared parts it builds on
_SCRIPTS: dict[str, tuple[str, ...]] = {
    "acquire": ("prelude", "leases", "acquire"),
    "adjust": ("prelude", "adjust"),
    "learn": ("prelude", "leases", "learn"),
    "aimd": ("aimd",),
    "release": ("prelude", "leases", "release"),
}


@functools.cache
def lua_script(name: str) -> str:
    """The source of the Lua script *name* (``"acquire"``, ``"adjust"``...), as sent to
    Redis: the shared parts it needs, then its own file, with the one starting AIMD cap
    of every limiter filled in. Read from the package once per process."""
    folder = resources.files("llmbatch.limits").joinpath("lua")
    parts = [folder.joinpath(f"{part}.lua").read_text(encoding="utf-8") for part in _SCRIPTS[name]]
    return "\n".join(parts).replace("AIMD_START", str(AIMD_START))


def _text(value: Any) -> str:
    """A script's string reply (bytes, unless the client decodes responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class _Taken(NamedTuple):
    """A successful acquire's reply, per dimension."""

    after: dict[str, float]  # available right after it
    outstanding: dict[str, float]  # taken by permits still unreleased before it
    adjusted: dict[str, float]  # cumulative corrections
    taken: dict[str, float]  # cumulative takings, this one included
    charged: dict[str, float]  # what the bucket was charged (the amount, plus transit)
    refunded: dict[str, float]  # cumulative refunds


def _taken(reply: Any, cost: Mapping[str, float]) -> _Taken:
    """A successful acquire's reply, per dimension of *cost* (see ``lua/acquire.lua``)."""
    taken = _Taken({}, {}, {}, {}, {}, {})
    for k, dim in enumerate(cost):
        for column, value in zip(taken, reply[3 + 6 * k : 9 + 6 * k], strict=True):
            column[dim] = float(value)
    return taken


def _parse_learned(text: str) -> dict[str, float]:
    """``"rpm=600,tpm=150000"`` → ``{"rpm": 600.0, "tpm": 150000.0}`` (junk skipped)."""
    found: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name in DIMENSIONS:
            try:
                found[name] = float(value)
            except ValueError:
                continue
    return found


def _where(redis: Any) -> str:
    """Where *redis* connects, for messages: ``redis://host:port/db`` or ``unix://path``
    (never its password)."""
    pool = getattr(redis, "connection_pool", None)
    options: Mapping[str, Any] = getattr(pool, "connection_kwargs", None) or {}
    if options.get("path"):
        return f"unix://{options['path']}"
    host, port = options.get("host", "localhost"), options.get("port", 6379)
    return f"redis://{host}:{port}/{options.get('db', 0)}"


def _cause(exc: BaseException) -> str:
    """What went wrong, in a few words: the operating system's reason when a socket
    failed ("Connection refused"; redis-py words it "Error 111 connecting to ..."), else
    the error's own message."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain of causes is short; a cycle must not hang us
        if seen is None:
            break
        if isinstance(seen, OSError):
            if seen.errno is not None and seen.errno > 0:
                return os.strerror(seen.errno)
            if seen.strerror:
                return str(seen.strerror)
        seen = seen.__cause__ or seen.__context__
    return str(exc).strip().rstrip(".") or type(exc).__name__


class RedisRateLimiter(Limiter):
    """A rate limiter whose buckets live in Redis (see the module docstring).

    Args:
        redis: a ``redis.asyncio.Redis`` client (the limiter closes it only if it made
            it: see :meth:`from_url`).
        limits: the quota's limits; ``Limits.auto()`` learns them, shared by every
            process, from the provider's headers.
        quota: the quota's name in Redis, e.g. ``"openai/chat/key-1a2b…/gpt-4o-mini"``.
        namespace: a prefix separating applications that share a Redis server.
        lease_seconds: how long a permit counts (in flight, and as outstanding) if its
            worker dies without releasing it. It must outlast the longest request: a
            lease that expires while its request is still running lets more requests in
            than ``max_concurrency`` and lifts levels by what that request may still
            spend. The default, 900 s, is comfortably longer than the OpenAI SDK's
            default timeout of 600 s (an attempt cannot last longer than that, and our
            retries are separate attempts with permits of their own).
        max_poll: the longest single sleep while waiting (seconds).
    """

    def __init__(
        self,
        redis: Redis,
        limits: Limits,
        *,
        quota: str,
        namespace: str = "default",
        lease_seconds: float = 900.0,
        max_poll: float = 1.0,
    ) -> None:
        self._redis = redis
        self._owns_client = False
        #: the server, for messages (the URL, password hidden, when from_url made it)
        self._where = _where(redis)
        self.limits = limits
        self.name = quota
        self._key = f"llmbatch:{namespace}:{quota}"
        self._leases = f"{self._key}:leases"
        self._counted = f"{self._key}:counted"  # what each lease counts as outstanding
        self._lease_seconds = lease_seconds
        self._max_poll = max_poll
        self._ttl = 86_400
        self._capacity: dict[str, float] = {}
        self._rates: dict[str, float] = {}
        for dim in DIMENSIONS:
            value = getattr(limits, dim)
            if value is not None:
                self._set_capacity(dim, value)
        self._learned_text = ""
        self._update_failures = 0
        self._learned: list[str] = []
        self._acquire_script = redis.register_script(lua_script("acquire"))
        self._adjust_script = redis.register_script(lua_script("adjust"))
        self._learn_script = redis.register_script(lua_script("learn"))
        self._aimd_script = redis.register_script(lua_script("aimd"))
        self._release_script = redis.register_script(lua_script("release"))
        self._leases_held: dict[int, str] = {}
        self._releasing: set[int] = set()  # permits whose release is not in Redis yet
        self._tasks: set[asyncio.Future[Any]] = set()
        self._turn = asyncio.Lock()
        self._changed = asyncio.Event()
        self._io = asyncio.Semaphore(8)  # updates (observe, settle, release) in flight at most
        self._rng = random.Random()
        self._acquired = 0
        self._in_flight = 0
        self._waiting = 0
        self._waited = 0.0
        self._max_wait = 0.0
        self._rate_limited = 0
        self._corrections = 0
        self._aimd_cap: float | None = None
        self._paused_until = 0.0  # loop time: the end of the pause this process knows of
        self._available: dict[str, float] = dict(self._capacity)

    @classmethod
    def from_url(
        cls,
        url: str,
        limits: Limits,
        *,
        quota: str,
        namespace: str = "default",
        **options: Any,
    ) -> RedisRateLimiter:
        """A limiter on the Redis server at *url* (``redis://``, ``rediss://``,
        ``unix://``), with a client of its own that :meth:`aclose` closes.

        Nothing is sent yet: :meth:`check` tries the server. The client waits at most
        5 s for a connection, unless the URL sets ``socket_connect_timeout``.

        Raises:
            ImportError: the ``redis`` extra is not installed.
            ValueError: *url* is not a Redis URL (another scheme, a port that is not a
                number...).
        """
        try:
            from redis.asyncio import Redis
        except ImportError:
            raise ImportError(
                "a redis:// limiter needs the redis client: pip install 'llmbatch[redis]'"
            ) from None
        try:
            # the URL's own socket_connect_timeout, if any, overrides this one
            client = Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT)
        except ValueError as exc:
            raise ValueError(redact(f"the limiter URL {url} is not a Redis URL: {exc}")) from exc
        limiter = cls(client, limits, quota=quota, namespace=namespace, **options)
        limiter._owns_client = True
        limiter._where = redact(url)
        return limiter

    async def check(self) -> None:
        """Make sure the shared limiter can be used before any request is sent: one
        round trip to Redis (``PING``), and the Lua scripts loaded (which compiles
        them), so a dead or misconfigured server stops the job at once instead of
        failing every item.

        Raises:
            LimiterUnavailable: Redis cannot be reached, refuses the password, or
                refuses a script.
        """
        scripts = (
            self._acquire_script,
            self._adjust_script,
            self._learn_script,
            self._aimd_script,
            self._release_script,
        )
        try:
            await self._redis.ping()
            for script in scripts:
                sha = _text(await self._redis.script_load(script.script))
                if sha != script.sha:
                    raise LimiterUnavailable(
                        f"the shared rate limiter at {self._where} stores its scripts under "
                        f"other names than this client computes ({sha} for {script.sha}): "
                        "no request is sent without its permit; check the Redis server"
                    )
        except Exception as exc:  # our own LimiterUnavailable goes through as it is
            unavailable = self._unavailable(exc)
            if unavailable is None:
                raise
            raise unavailable from exc

    def _unavailable(self, exc: Exception) -> LimiterUnavailable | None:
        """*exc*, raised by redis-py while asking for a permit (or checking), as the
        fatal error that says which server and why; ``None`` if it did not come from
        Redis."""
        # Imported here, as in from_url: the module loads without the redis extra (to
        # say what to install), and a client of it raised *exc*.
        from redis import exceptions as redis_errors

        pool = getattr(self._redis, "connection_pool", None)
        password = getattr(pool, "connection_kwargs", {}).get("password")
        cause = _cause(exc)
        if password:
            cause = cause.replace(str(password), "***")
        if isinstance(exc, redis_errors.AuthenticationError) or (
            # NOAUTH and WRONGPASS, should a redis-py version not map them
            isinstance(exc, redis_errors.ResponseError)
            and str(exc).startswith(("NOAUTH", "WRONGPASS", "invalid password"))
        ):
            if password:
                problem = "refuses the password"
                advice = "check the password in the limiter URL (" + _WHERE_CONFIGURED + ")"
            else:
                # redis-py's words for this are about its HELLO handshake
                problem, cause = "requires a password", "the limiter URL gives none"
                advice = "put the password in the limiter URL (" + _WHERE_CONFIGURED + ")"
        elif isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError):
            problem = "cannot be reached"
            advice = "start Redis, or stop sharing the quota (" + _WHERE_CONFIGURED + ")"
        elif isinstance(exc, redis_errors.RedisError):
            problem = "fails"  # a script refused, out of memory, a read-only replica...
            advice = "check the Redis server and its log, or stop sharing the quota"
        else:
            return None
        return LimiterUnavailable(
            f"the shared rate limiter at {self._where} {problem} ({cause}): "
            f"no request is sent without its permit; {advice}"
        )

    async def aclose(self) -> None:
        """Finish the background updates, then close the Redis client if this limiter
        made it (:meth:`from_url`)."""
        await self.flush()
        if self._owns_client:
            await self._redis.aclose()

    def __repr__(self) -> str:
        dims = ", ".join(f"{d}={c:,.0f}" for d, c in self._capacity.items()) or "unlimited"
        return f"<RedisRateLimiter {self._key} {dims} in_flight={self._in_flight}>"

    def _fill(self, dim: str) -> float:
        """The share of *dim*'s bucket available when Redis first creates it."""
        return self.limits.start_fill(self._capacity[dim], DIMENSIONS[dim][1])

    def _set_capacity(self, dim: str, limit: float) -> None:
        capacity = limit * (1.0 - self.limits.headroom)
        self._capacity[dim] = capacity
        self._rates[dim] = capacity / DIMENSIONS[dim][1]

    def _adopt(self, text: str) -> None:
        """Pace at the limits the quota has learned (from this or another process)."""
        if text == self._learned_text:
            return
        self._learned_text = text
        for dim, limit in _parse_learned(text).items():
            capacity = limit * (1.0 - self.limits.headroom)
            if not self._may_adopt(dim, capacity):
                continue
            if abs(self._capacity.get(dim, -1.0) - capacity) > 0.5:
                if dim not in self._capacity:
                    self._learned.append(dim)
                self._set_capacity(dim, limit)
                self._available.setdefault(dim, capacity)
                logger.info("limits.learned", limiter=self.name, dimension=dim, limit=limit)

    def _may_adopt(self, dim: str, capacity: float) -> bool:
        """Whether a limit the server reports replaces ours: always when ours is an
        estimate (``Limits.learn``); when ours was given explicitly, only if lower."""
        if self.limits.learn:
            return True
        return dim in self._capacity and capacity < self._capacity[dim] - 0.5

    def _dimension_args(self, amounts: Mapping[str, float]) -> list[Any]:
        args: list[Any] = [len(amounts)]
        for dim, amount in amounts.items():
            capacity = self._capacity[dim]
            cushion = capacity * self.limits.reserve
            transit = self._rates[dim] * self.limits.transit
            args += [dim, capacity, self._rates[dim], amount, self._fill(dim), cushion]
            args.append(transit)
        return args

    def _paused_for(self, seconds: float) -> None:
        """Redis says the quota is paused for *seconds* more (a 429, here or elsewhere)."""
        if seconds > 0:
            until = asyncio.get_running_loop().time() + seconds
            self._paused_until = max(self._paused_until, until)

    async def try_acquire(
        self,
        requests: float = 1,
        tokens: float = 0,
        *,
        input_tokens: float = 0,
        output_tokens: float = 0,
    ) -> tuple[float, BucketPermit | None]:
        """One atomic attempt: ``(0, permit)`` if taken, else ``(seconds to wait, None)``.

        A negative wait means "a concurrency slot is needed": poll again soon. If the
        quota has learned limits this limiter does not pace at yet (another process
        learned them), it adopts them and tries again at once, so the request is charged
        for them (and too large a request fails) like any other.

        Raises:
            RequestTooLarge: the request exceeds a bucket's capacity.
            LimiterUnavailable: Redis cannot be used (see :meth:`check`).
        """
        units = {
            "requests": float(requests),
            "tokens": float(tokens),
            "input_tokens": float(input_tokens),
            "output_tokens": float(output_tokens),
        }
        while True:
            cost = {dim: units[DIMENSIONS[dim][0]] for dim in self._capacity}
            for dim, amount in cost.items():
                if amount > self._capacity[dim]:
                    raise RequestTooLarge(dim, amount, self._capacity[dim])
            lease = uuid.uuid4().hex
            args: list[Any] = [
                self._ttl,
                self.limits.max_concurrency or (AIMD_CEILING if self._probing() else 0),
                lease,
                self._lease_seconds,
                1 if self.limits.aimd else 0,
                1 if self.limits.learn else 0,
                self._learned_text,
                *(units[unit] for unit in UNITS),
                *self._dimension_args(cost),
            ]
            reply = await self._run_acquire(args, cost, lease)
            status = _text(reply[0])
            self._adopt(_text(reply[1]))
            if status != "learned":
                break
        self._paused_for(float(reply[2]))
        wait = float(status)
        if wait != 0:
            return wait, None
        taken = _taken(reply, cost)
        self._available.update(taken.after)
        loop_time = asyncio.get_running_loop().time()
        permit = BucketPermit(
            self,
            cost,
            taken.after,
            taken.adjusted,
            taken.outstanding,
            taken.taken,
            units,
            loop_time,
        )
        permit.refunded_at = taken.refunded
        self._leases_held[id(permit)] = lease
        self._acquired += 1
        self._in_flight += 1
        return 0.0, permit

    async def _run_acquire(self, args: list[Any], cost: Mapping[str, float], lease: str) -> Any:
        """The acquire script's reply. Cancelled while the script is on its way (it may
        have run in Redis already), the call goes on in the background and whatever it
        took is given back: a cancelled waiter takes nothing."""
        call = asyncio.ensure_future(
            self._acquire_script(keys=[self._key, self._leases, self._counted], args=args)
        )
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            self._spawn(self._undo(call, cost, lease))
            raise
        except Exception as exc:
            unavailable = self._unavailable(exc)
            if unavailable is None:
                raise
            raise unavailable from exc

    async def _undo(self, call: asyncio.Future[Any], cost: Mapping[str, float], lease: str) -> None:
        """Give back what a cancelled acquire took, once its reply says what that was."""
        try:
            reply = await call
        except Exception:
            # The outcome is unknown (a lost connection): a permit it took, if any, stops
            # counting when its lease expires.
            logger.debug("limits.undo_unknown", limiter=self.name, lease=lease)
            return
        if _text(reply[0]) != "0":
            return  # refused: nothing was taken
        charges = _taken(reply, cost).charged
        args: list[Any] = [self._ttl, lease, len(charges)]
        for dim, charge in charges.items():
            args += [dim, self._capacity[dim], self._rates[dim], self._fill(dim), charge]
        await self._call(self._release_script, [self._key, self._leases, self._counted], args)
        self._changed.set()

    async def acquire(
        self,
        requests: float = 1,
        tokens: float = 0,
        *,
        input_tokens: float = 0,
        output_tokens: float = 0,
    ) -> Permit:
        """Wait until the request fits every shared limit, then take it all at once.

        Waiters of this process are served in arrival order. A waiter that is cancelled
        takes nothing.

        Raises:
            RequestTooLarge: the request exceeds a bucket's capacity.
            LimiterUnavailable: Redis cannot be used (see :meth:`check`).
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._waiting += 1
        try:
            # One waiter per process polls Redis at a time (asyncio.Lock is first come,
            # first served): fair within the process, and one connection is enough.
            async with self._turn:
                while True:
                    wait, permit = await self.try_acquire(
                        requests, tokens, input_tokens=input_tokens, output_tokens=output_tokens
                    )
                    if permit is not None:
                        break
                    delay = 0.02 if wait < 0 else min(wait, self._max_poll)
                    # Sleep until the bucket should fit, or until this process learns
                    # something that may change that (a header lift, a release).
                    self._changed.clear()
                    try:
                        async with asyncio.timeout(delay * (1.0 + 0.02 * self._rng.random())):
                            await self._changed.wait()
                    except TimeoutError:
                        pass
        finally:
            self._waiting -= 1
        waited = loop.time() - started
        self._waited += waited
        self._max_wait = max(self._max_wait, waited)
        if waited > 1.0:
            logger.debug("limits.waited", limiter=self.name, seconds=round(waited, 3))
        return permit

    # Permit calls these two back.
    def _release(self, permit: BucketPermit) -> None:
        self._in_flight -= 1
        self._changed.set()
        lease = self._leases_held.pop(id(permit), None) or ""
        self._releasing.add(id(permit))
        self._spawn(self._released(permit, [self._ttl, lease, 0]))

    async def _released(self, permit: BucketPermit, args: list[Any]) -> None:
        try:
            await self._call(self._release_script, [self._key, self._leases, self._counted], args)
        finally:
            self._releasing.discard(id(permit))

    def _settle(self, permit: BucketPermit, actual: Mapping[str, float], refund: bool) -> None:
        delta: dict[str, float] = {}
        for dim, reserved in permit.cost.items():
            unit = DIMENSIONS[dim][0]
            if unit in actual:
                difference = actual[unit] - reserved
                if difference > 0 or refund:
                    delta[dim] = difference
        if delta:
            self._spawn(self._adjust("add", delta))
        if self._probing():
            self._spawn(self._aimd("up"))

    def _probing(self) -> bool:
        """Whether the shared AIMD cap is in force (``aimd`` and no limit known yet)."""
        return self.limits.aimd and not self._capacity

    async def _aimd(self, direction: str) -> None:
        reply = await self._call(
            self._aimd_script,
            [self._key],
            [direction, self.limits.max_concurrency or AIMD_CEILING, self._ttl],
        )
        self._aimd_cap = float(reply)

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a script, with at most a few updates in flight (a bounded connection pool)."""
        async with self._io:
            return await script(keys=keys, args=args)

    def _spawn(self, coro: Any) -> None:
        """Run a Redis update in the background (sync callers: ``Permit.release``/``settle``)."""

        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        """A background update ended; a failure (Redis gone mid-run) is logged once,
        not left for asyncio to report as a never-retrieved exception per task: the
        leases it could not release expire on their own."""
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        self._update_failures += 1
        if self._update_failures == 1:
            exc = task.exception()
            logger.warning(
                "limits.update_failed",
                limiter=self.name,
                error=redact(f"{type(exc).__name__}: {exc}"),
                detail="the shared limiter could not record a release or settlement; "
                "its leases expire on their own",
            )

    async def flush(self) -> None:
        """Wait for background Redis updates (releases, settlements) to complete."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _adjust(
        self,
        mode: str,
        values: Mapping[str, float],
        pause: float = 0.0,
        permit: BucketPermit | None = None,
        lag: float = 0.0,
    ) -> dict[str, float]:
        args: list[Any] = [mode, pause, self._ttl, self.limits.reserve, len(values)]
        for dim, value in values.items():
            unit = DIMENSIONS[dim][0]
            args += [dim, unit, self._capacity[dim], self._rates[dim], self._fill(dim), value]
            if permit is not None and dim in permit.available_after:
                args += [
                    permit.available_after[dim],
                    # what may not have reached the server yet, and its refill meanwhile
                    permit.outstanding_before.get(dim, 0.0) + self._rates[dim] * lag,
                    permit.adjusted_at.get(dim, 0.0),
                    permit.taken_at.get(dim, 0.0),
                    permit.refunded_at.get(dim, 0.0),
                ]
            else:
                # No permit to compare with: what Redis counts in flight may not have
                # reached the server, but for the reporting request's own units.
                args += [-1, self._own_units(permit, unit), 0, 0, 0]
        reply = await self._call(self._adjust_script, [self._key], args)
        self._paused_for(float(reply[0]))
        after = {dim: float(v) for dim, v in zip(values, reply[1:], strict=True)}
        self._available.update(after)
        return after

    def _own_units(self, permit: BucketPermit | None, unit: str) -> float:
        """*permit*'s *unit* if Redis still counts it in flight (not released, or its
        release not in Redis yet), else 0."""
        if permit is not None and (not permit.released or id(permit) in self._releasing):
            return permit.units.get(unit, 0.0)
        return 0.0

    async def _learn(self, info: RateLimitHeaders, permit: BucketPermit | None) -> set[str]:
        """Store the limits *info* reports that this limiter does not pace at yet; the
        dimensions whose bucket this call started."""
        new = {
            dim: limit
            for dim, limit in info.limits.items()
            if abs(self._capacity.get(dim, -1.0) - limit * (1.0 - self.limits.headroom)) > 0.5
            and self._may_adopt(dim, limit * (1.0 - self.limits.headroom))
            and plausible_limit(dim, limit, permit)
        }
        if not new:
            return set()
        fill = min(self.limits.start_fill(limit, DIMENSIONS[dim][1]) for dim, limit in new.items())
        args: list[Any] = [self._ttl, fill, len(new)]
        for dim, limit in new.items():
            unit = DIMENSIONS[dim][0]
            capacity = limit * (1.0 - self.limits.headroom)
            args += [dim, limit, capacity, capacity / DIMENSIONS[dim][1]]
            args += [info.remaining.get(dim, -1), unit, self._own_units(permit, unit)]
        reply = await self._call(self._learn_script, [self._key, self._leases, self._counted], args)
        started = {dim for dim in new if dim not in self._capacity}
        self._adopt(_text(reply[0]))
        self._available.update({dim: float(v) for dim, v in zip(new, reply[1:], strict=True)})
        return started

    async def observe(
        self, headers: Mapping[str, str] | RateLimitHeaders, permit: Permit | None = None
    ) -> None:
        """Correct the shared buckets from a response's headers, as
        :meth:`RateLimiter.observe <llmbatch.limits.RateLimiter.observe>` does, with the
        bookkeeping (outstanding, taken, refunds, corrections, learned limits) kept in
        Redis for every process.

        Raises:
            TypeError: *permit* was not issued by a bucket limiter.
        """
        if permit is not None and not isinstance(permit, BucketPermit):
            raise TypeError(f"{permit!r} is not a permit of {self!r}")
        info = headers if isinstance(headers, RateLimitHeaders) else RateLimitHeaders.parse(headers)
        started: set[str] = set()
        if info.limits:
            started = await self._learn(info, permit)
        left = {
            d: float(v)
            for d, v in info.remaining.items()
            if d in self._capacity and d not in started
        }
        if left:
            before = dict(self._available)
            lag = 0.0
            if permit is not None:
                lag = send_lag(permit, info.processing, asyncio.get_running_loop().time())
            after = await self._adjust("observe", left, permit=permit, lag=lag)
            for dim, now_left in after.items():
                if abs(now_left - before.get(dim, now_left)) > 1:
                    self._corrections += 1
                    logger.debug(
                        "limits.corrected",
                        limiter=self.name,
                        dimension=dim,
                        delta=round(now_left - before.get(dim, now_left), 1),
                        server_left=left[dim],
                    )
        if left or started:
            self._changed.set()  # a lift may let the waiting head through now

    async def on_rate_limited(
        self, retry_after: float | None = None, *, dimension: str | None = None
    ) -> None:
        """Pause every process sharing the quota, and restart the bucket(s) empty: the
        one that overflowed, else every per-minute one (never a per-day one)."""
        self._rate_limited += 1
        seconds = retry_after if retry_after and retry_after > 0 else 1.0
        if dimension in self._capacity:
            targets = [dimension]
        else:
            targets = [d for d in self._capacity if d in MINUTE_DIMENSIONS]
        await self._adjust("empty", dict.fromkeys(targets, 0.0), pause=seconds)
        if self._probing():
            await self._aimd("down")
        logger.info(
            "limits.cooldown",
            limiter=self.name,
            seconds=round(seconds, 3),
            dimension=dimension,
            shared=True,
        )

    def statistics(self) -> LimiterStatistics:
        """A snapshot of this process's counters and the last levels it saw in Redis;
        ``cooldown_remaining`` is what is left of the longest pause this process knows
        of (its own 429s, and the pauses Redis refused or answered it with)."""
        cap: float | None = float(self.limits.max_concurrency or 0) or None
        if self._probing():
            cap = (
                self._aimd_cap
                if self._aimd_cap is not None
                else min(cap or AIMD_CEILING, AIMD_START)
            )
        cooldown = 0.0
        try:
            cooldown = max(0.0, self._paused_until - asyncio.get_running_loop().time())
        except RuntimeError:
            pass  # no running loop
        return LimiterStatistics(
            acquired=self._acquired,
            waiting=self._waiting,
            in_flight=self._in_flight,
            concurrency_cap=cap,
            waited_seconds=self._waited,
            max_wait_seconds=self._max_wait,
            rate_limited=self._rate_limited,
            cooldown_remaining=cooldown,
            header_corrections=self._corrections,
            learned=tuple(self._learned),
            available=dict(self._available),
            capacity=dict(self._capacity),
            limits=dict(self._capacity),
        )
