"""Tests for llmbatch.retry: policies as pure functions, and the retry loop on fake time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from structlog.testing import capture_logs
from tenacity import RetryCallState, stop_after_attempt, wait_fixed

from llmbatch.errors import (
    AuthenticationFailed,
    BadRequest,
    ConnectionFailed,
    ContextLengthExceeded,
    LLMBatchError,
    ProviderUnavailable,
    QuotaExhausted,
    RateLimited,
    Timeout,
)
from llmbatch.retry import (
    RetryLog,
    RetryPolicy,
    parse_retry_after,
    retry_if_transient,
    wait_retry_after,
)
from llmbatch.testing import FakeClock


def make_retry_state(attempt: int, exc: BaseException | None) -> RetryCallState:
    """A tenacity retry state after *attempt* failed with *exc* (as tenacity's tests do)."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    if exc is not None:
        state.set_exception((type(exc), exc, None))
    state.outcome_timestamp = state.start_time + 1.0
    return state


NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"x-ms-retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "100", "retry-after": "20"}, 0.1),  # ms wins
        ({"Retry-After": "20"}, 20.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": "Sat, 28 Nov 2026 12:00:30 GMT"}, 30.0),
        ({"retry-after": "Sat, 28 Nov 2026 11:00:00 GMT"}, 0.0),  # in the past
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-3"}, None),
        ({"retry-after-ms": "nan", "retry-after": "2"}, 2.0),
        ({"retry-after": "inf"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    """retry-after-ms > retry-after seconds > HTTP date; garbage is ignored."""
    assert expected == parse_retry_after(headers, now=NOW)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (RateLimited("slow down"), True),
        (ProviderUnavailable("502"), True),
        (Timeout("no answer"), True),
        (ConnectionFailed("reset"), True),
        (BadRequest("bad"), False),
        (ContextLengthExceeded("too long"), False),
        (AuthenticationFailed("401"), False),
        (QuotaExhausted("no credit"), False),
        (ValueError("a bug"), False),
    ],
)
def test_retry_if_transient(exc: BaseException, expected: bool) -> None:
    """Only transient errors are retried."""
    assert expected == retry_if_transient()(make_retry_state(1, exc))


@pytest.mark.parametrize(
    ("exc", "max_wait", "ignore_rate_limits", "expected"),
    [
        (RateLimited("x", retry_after=7.0), 120.0, False, 7.0),
        (RateLimited("x", retry_after=500.0), 120.0, False, 120.0),  # capped
        (RateLimited("x", retry_after=7.0), 120.0, True, 0.0),  # the limiter's cooldown waits
        (ProviderUnavailable("x", retry_after=2.0), 120.0, True, 2.0),
        (ProviderUnavailable("x"), 120.0, False, 3.0),  # no hint: the fallback
        (ValueError("x"), 120.0, False, 3.0),
    ],
)
def test_wait_retry_after(
    exc: BaseException, max_wait: float, ignore_rate_limits: bool, expected: float
) -> None:
    """The provider's hint is honoured up to a cap; otherwise the fallback decides."""
    wait = wait_retry_after(wait_fixed(3), max_wait=max_wait, ignore_rate_limits=ignore_rate_limits)
    assert expected == wait(make_retry_state(2, exc))


def test_default_wait_is_exponential_with_full_jitter_and_bounded() -> None:
    """Without a hint the default wait is random in [0, 0.5 s x 2^n], never above 30 s."""
    wait = RetryPolicy().wait
    first = [wait(make_retry_state(1, ProviderUnavailable("x"))) for _ in range(200)]
    late = [wait(make_retry_state(12, ProviderUnavailable("x"))) for _ in range(200)]
    assert all(0.0 <= w <= 1.0 for w in first)
    assert all(0.0 <= w <= 30.0 for w in late)
    assert max(late) > 15.0  # the cap is reached, not the small early range
    assert len(set(first)) > 100  # jittered: no two clients retry in lockstep


class Flaky:
    """Fails with the given errors in turn, then returns 'ok'."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


async def test_policy_retries_transient_errors_waiting_the_hints() -> None:
    """Transient failures are retried, each wait taken from the hint or the backoff."""
    clock = FakeClock()
    fn = Flaky(RateLimited("429", retry_after=2.0), ProviderUnavailable("503", retry_after=1.0))
    policy = RetryPolicy(wait=wait_retry_after(wait_fixed(5)))
    assert "ok" == await policy.call(fn, sleep=clock.sleep)
    assert (3, [2.0, 1.0]) == (fn.calls, clock.sleeps)


@pytest.mark.parametrize(
    "error",
    [BadRequest("bad"), AuthenticationFailed("401"), QuotaExhausted("quota"), KeyError("bug")],
)
async def test_policy_never_retries_permanent_fatal_or_unexpected_errors(
    error: BaseException,
) -> None:
    """Permanent, fatal and unexpected errors surface after one attempt."""
    clock = FakeClock()
    fn = Flaky(error)
    with pytest.raises(type(error)):
        await RetryPolicy().call(fn, sleep=clock.sleep)
    assert (1, []) == (fn.calls, clock.sleeps)


async def test_policy_gives_up_after_the_stop_and_raises_the_last_error() -> None:
    """After the last attempt the last error propagates unchanged."""
    clock = FakeClock()
    fn = Flaky(*(ProviderUnavailable(f"503 #{i}") for i in range(10)))
    with pytest.raises(ProviderUnavailable, match="503 #2"):
        await RetryPolicy(stop=stop_after_attempt(3), wait=wait_fixed(1)).call(
            fn, sleep=clock.sleep
        )
    assert (3, [1.0, 1.0]) == (fn.calls, clock.sleeps)


async def test_attempt_timeout_turns_a_hang_into_a_retried_timeout() -> None:
    """An attempt slower than attempt_timeout becomes Timeout and is retried."""
    clock = FakeClock()
    calls = 0

    async def hangs_once() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(3600)
        return "ok"

    policy = RetryPolicy(attempt_timeout=30, wait=wait_fixed(0))
    log = RetryLog()
    with clock.patch_loop():
        assert "ok" == await policy.call(hangs_once, log=log)
    assert (2, {"Timeout": 1}) == (calls, log.statistics().retries)
    assert 30.0 == pytest.approx(clock.time())


async def test_retry_log_counts_and_logs() -> None:
    """The before_sleep hook logs each retry and counts attempts, classes and waits."""
    clock = FakeClock()
    log = RetryLog()
    fn = Flaky(RateLimited("429", retry_after=2.0), Timeout("slow"))
    seen: list[int] = []
    with capture_logs() as logs:
        await RetryPolicy(wait=wait_retry_after(wait_fixed(4))).call(
            fn, sleep=clock.sleep, log=log, on_attempt=seen.append
        )
    stats = log.statistics()
    assert (3, {"RateLimited": 1, "Timeout": 1}, 6.0) == (
        stats.attempts,
        stats.retries,
        stats.waited_seconds,
    )
    assert [1, 2, 3] == seen
    assert [("retry.scheduled", 1, "RateLimited", 2.0), ("retry.scheduled", 2, "Timeout", 4.0)] == [
        (e["event"], e["attempt"], e["error"], e["wait"]) for e in logs
    ]


def test_presets_and_copy() -> None:
    """none() makes one attempt; patient() allows many; copy() leaves the original alone."""
    assert RetryPolicy.none().stop(make_retry_state(1, None))
    patient = RetryPolicy.patient()
    assert not patient.stop(make_retry_state(19, None))
    tweaked = patient.copy(attempt_timeout=5.0)
    assert (None, 5.0) == (patient.attempt_timeout, tweaked.attempt_timeout)


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (
            QuotaExhausted("no credit", provider="openai", model="gpt-4o-mini", status_code=429),
            "openai/gpt-4o-mini (HTTP 429): no credit",
        ),
        (BadRequest("key sk-proj-abcdefghijklmnop1234 is bad"), "key sk-proj-…1234 is bad"),
        (LLMBatchError("Bearer abcdefghijklmnopqrstu9876 rejected"), "Bearer …9876 rejected"),
    ],
)
def test_error_text_has_context_and_no_secrets(error: LLMBatchError, text: str) -> None:
    """Errors print provider/model/status and never an API key."""
    assert text == str(error)


def test_error_context_dict() -> None:
    """context() lists the known fields only."""
    error = RateLimited("x", kind="tokens", provider="openai", retry_after=1.5, attempt=2)
    assert {"provider": "openai", "retry_after": 1.5, "attempt": 2} == error.context()
    assert "tokens" == error.kind
