"""The simulator's Anthropic Messages endpoint, driven by the official ``anthropic`` client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import anthropic
import pytest
from anthropic.types import MessageParam

from llmbatch.testing import FakeClock, Fault, Simulator
from llmbatch.testing._content import content_tag, estimate_tokens
from llmbatch.testing.pytest_plugin import SimulatorFactory

MODEL = "claude-haiku-4-5"
PROMPT = "Name three moons of Jupiter."
USER: list[MessageParam] = [{"role": "user", "content": PROMPT}]
INPUT = estimate_tokens({"messages": USER})

MakeClient = Callable[..., Awaitable[tuple[Simulator, FakeClock, anthropic.AsyncAnthropic]]]


@pytest.fixture
async def make_client(simulator_factory: SimulatorFactory) -> AsyncIterator[MakeClient]:
    """``await make_client(rpm=...)``: a simulator on a FakeClock and an Anthropic client."""
    clients: list[anthropic.AsyncAnthropic] = []

    async def make(
        **options: Any,
    ) -> tuple[Simulator, FakeClock, anthropic.AsyncAnthropic]:
        clock = FakeClock()
        sim = await simulator_factory(clock=clock, **options)
        client = anthropic.AsyncAnthropic(base_url=sim.url, api_key="sk-ant-test", max_retries=0)
        clients.append(client)
        return sim, clock, client

    yield make
    for client in clients:
        await client.close()


async def test_message_is_tagged_with_its_input(make_client: MakeClient) -> None:
    """The answer carries the prompt's tag and Anthropic's usage fields."""
    _, _, client = await make_client()
    message = await client.messages.create(model=MODEL, max_tokens=100, messages=USER)
    block = message.content[0]
    assert isinstance(block, anthropic.types.TextBlock)
    assert block.text.startswith(f"[{content_tag(PROMPT)}]")
    assert (INPUT, len(block.text.split(" "))) == (
        message.usage.input_tokens,
        message.usage.output_tokens,
    )
    assert ("end_turn", MODEL) == (message.stop_reason, message.model)
    assert message.id.startswith("msg_")


async def test_max_tokens_truncates(make_client: MakeClient) -> None:
    """A small ``max_tokens`` stops the answer with ``stop_reason="max_tokens"``."""
    _, _, client = await make_client()
    message = await client.messages.create(model=MODEL, max_tokens=2, messages=USER)
    assert (2, "max_tokens") == (message.usage.output_tokens, message.stop_reason)


async def test_streaming_rebuilds_the_message(make_client: MakeClient) -> None:
    """The SSE events (message_start ... message_stop) rebuild the non-streamed message."""
    _, _, client = await make_client()
    full = await client.messages.create(model=MODEL, max_tokens=100, messages=USER)
    async with client.messages.stream(model=MODEL, max_tokens=100, messages=USER) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert full.content[0].text == "".join(pieces)  # type: ignore[union-attr]
    assert full.usage.output_tokens == final.usage.output_tokens
    assert full.stop_reason == final.stop_reason


async def test_models_list_in_anthropic_shape(make_client: MakeClient) -> None:
    """``GET /v1/models`` with ``anthropic-version`` answers in Anthropic's page shape."""
    _, _, client = await make_client(models=("claude-a", "claude-b"))
    page = await client.models.list()
    assert ["claude-a", "claude-b"] == [model.id for model in page.data]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": 10, "messages": USER}, "model: Field required"),
        ({"model": MODEL, "messages": USER}, "max_tokens: Field required"),
        ({"model": MODEL, "max_tokens": 0, "messages": USER}, "max_tokens: Input should be"),
        ({"model": MODEL, "max_tokens": 10}, "messages: Field required"),
        ({"model": MODEL, "max_tokens": 10, "messages": []}, "messages: List should have"),
        (
            {"model": MODEL, "max_tokens": 10, "messages": [{"role": "system", "content": "x"}]},
            "messages.0.role: Input should be 'user' or 'assistant'",
        ),
        (
            {"model": MODEL, "max_tokens": 200_000, "messages": USER},
            "input length and `max_tokens` exceed context limit",
        ),
    ],
)
async def test_validation_errors(
    make_client: MakeClient, body: dict[str, Any], message: str
) -> None:
    """Invalid requests are 400 ``invalid_request_error`` in Anthropic's error shape."""
    _, _, client = await make_client()
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.post("/v1/messages", body=body, cast_to=object)
    assert isinstance(info.value.body, dict)
    assert "error" == info.value.body["type"]
    assert "invalid_request_error" == info.value.body["error"]["type"]
    assert info.value.body["error"]["message"].startswith(message)
    assert info.value.body["request_id"] == info.value.response.headers["request-id"]


async def test_version_header_and_key_are_required(simulator: Simulator) -> None:
    """Without ``anthropic-version`` it is 400; without ``x-api-key`` 401."""
    body = {"model": MODEL, "max_tokens": 10, "messages": USER}
    async with aiohttp.ClientSession() as session:
        url = f"{simulator.url}/v1/messages"
        async with session.post(url, json=body, headers={"x-api-key": "k"}) as response:
            no_version = (response.status, (await response.json())["error"]["type"])
        async with session.post(url, json=body, headers={"anthropic-version": "2023-06-01"}) as r:
            no_key = (r.status, (await r.json())["error"])
    assert (400, "invalid_request_error") == no_version
    assert (
        401,
        {"type": "authentication_error", "message": "x-api-key header is required"},
    ) == no_key


async def test_rate_limit_headers_and_rfc3339_resets(make_client: MakeClient) -> None:
    """RPM/ITPM/OTPM headers report limit, remaining and an RFC 3339 UTC reset time."""
    sim, _, client = await make_client(rpm=50, itpm=10_000, otpm=2_000)
    before = datetime.now(UTC).replace(microsecond=0)
    raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=500, messages=USER)
    after = datetime.now(UTC)
    headers = raw.headers
    prefix = "anthropic-ratelimit-"
    assert ("50", "49") == (
        headers[prefix + "requests-limit"],
        headers[prefix + "requests-remaining"],
    )
    assert str(10_000 - INPUT) == headers[prefix + "input-tokens-remaining"]
    # the answer was short, so the unused part of the 500 reserved is refunded afterwards,
    # but the headers were written while the full reservation stood
    assert str(1500) == headers[prefix + "output-tokens-remaining"]
    assert ("2000", "1500") == (
        headers[prefix + "tokens-limit"],
        headers[prefix + "tokens-remaining"],
    )
    reset = datetime.strptime(headers[prefix + "requests-reset"], "%Y-%m-%dT%H:%M:%SZ")
    reset = reset.replace(tzinfo=UTC)
    # one request of 50/min refills in 1.2 s, rounded up to the next whole second
    assert before + timedelta(seconds=1) <= reset <= after + timedelta(seconds=3)
    assert headers["request-id"].startswith("req_")
    assert 1 == sim.stats().ok


async def test_quantized_buckets_report_the_limit_and_burst_a_tenth(
    make_client: MakeClient,
) -> None:
    """With ``bucket_seconds=6`` RPM/ITPM/OTPM buckets hold 6 s of their limit: the headers
    keep the per-minute limits, ``remaining`` counts down the short buckets, and RPM 600
    lets exactly 60 through at once, then 10 per second."""
    _, clock, client = await make_client(
        rpm=600, itpm=60_000, otpm=12_000, bucket_seconds=6, charge_rejected="none"
    )
    raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=500, messages=USER)
    headers = raw.headers
    prefix = "anthropic-ratelimit-"
    assert [
        ("600", "59"),
        ("60000", str(6_000 - INPUT)),
        ("12000", "700"),  # 1,200 held, 500 reserved
        ("12000", "700"),  # the tightest token bucket
    ] == [
        (headers[f"{prefix}{kind}-limit"], headers[f"{prefix}{kind}-remaining"])
        for kind in ("requests", "input-tokens", "output-tokens", "tokens")
    ]
    for _ in range(59):
        await client.messages.create(model=MODEL, max_tokens=10, messages=USER)
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(model=MODEL, max_tokens=10, messages=USER)
    body = info.value.body
    assert isinstance(body, dict)
    assert "rate limit of 600 requests per minute" in body["error"]["message"]
    assert "1" == info.value.response.headers["retry-after"]  # 0.1 s, in whole seconds
    clock.advance(0.1)
    await client.messages.create(model=MODEL, max_tokens=10, messages=USER)


async def test_quantized_itpm_rejects_beyond_the_short_bucket(make_client: MakeClient) -> None:
    """ITPM 600 over 6 s holds 60 input tokens: a second prompt waits for the refill."""
    _, clock, client = await make_client(itpm=600, bucket_seconds=6, charge_rejected="none")
    long: list[MessageParam] = [{"role": "user", "content": "x" * 160}]  # 40 tokens + 4
    await client.messages.create(model=MODEL, max_tokens=10, messages=long)
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(model=MODEL, max_tokens=10, messages=long)
    assert "rate limit of 600 input tokens per minute" in str(info.value.body)
    assert "3" == info.value.response.headers["retry-after"]  # 28 tokens at 10/s: 2.8 s
    clock.advance(2.8)
    await client.messages.create(model=MODEL, max_tokens=10, messages=long)


async def test_rpm_429_is_a_rate_limit_error(make_client: MakeClient) -> None:
    """Past RPM: 429 ``rate_limit_error`` with ``retry-after``, counted as an Anthropic 429."""
    sim, clock, client = await make_client(rpm=2, charge_rejected="none")
    for _ in range(2):
        await client.messages.create(model=MODEL, max_tokens=10, messages=USER)
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(model=MODEL, max_tokens=10, messages=USER)
    body = info.value.body
    assert isinstance(body, dict)
    assert "rate_limit_error" == body["error"]["type"]
    assert "rate limit of 2 requests per minute" in body["error"]["message"]
    assert "30" == info.value.response.headers["retry-after"]
    assert {"anthropic": 1} == dict(sim.stats().rate_limited)
    clock.advance(30)
    await client.messages.create(model=MODEL, max_tokens=10, messages=USER)


async def test_otpm_reserves_max_tokens_then_refunds(make_client: MakeClient) -> None:
    """``otpm_reservation="max_tokens"``: admission needs max_tokens free; the unused part
    comes back once the answer is known."""
    _, _, client = await make_client(otpm=1000)
    first = await client.messages.create(model=MODEL, max_tokens=600, messages=USER)
    produced = first.usage.output_tokens
    raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=600, messages=USER)
    assert str(1000 - produced - 600) == raw.headers["anthropic-ratelimit-output-tokens-remaining"]
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(model=MODEL, max_tokens=990, messages=USER)
    assert isinstance(info.value.body, dict)
    assert "1,000 output tokens per minute" in info.value.body["error"]["message"]


async def test_otpm_actual_ignores_max_tokens(make_client: MakeClient) -> None:
    """``otpm_reservation="actual"``: max_tokens is not reserved; real output is charged after."""
    _, clock, client = await make_client(otpm=40, otpm_reservation="actual", charge_rejected="none")
    raw = await client.messages.with_raw_response.create(
        model=MODEL, max_tokens=20_000, messages=USER
    )
    assert "40" == raw.headers["anthropic-ratelimit-output-tokens-remaining"]
    produced = (await raw.parse()).usage.output_tokens
    second = await client.messages.create(model=MODEL, max_tokens=20_000, messages=USER)
    assert 40 - 2 * produced < 0  # now in debt: the next request must wait
    with pytest.raises(anthropic.RateLimitError):
        await client.messages.create(model=MODEL, max_tokens=10, messages=USER)
    clock.advance((2 * produced - 40) * 60 / 40)
    await client.messages.create(model=MODEL, max_tokens=10, messages=USER)
    assert produced == second.usage.output_tokens


async def test_itpm_request_too_large(make_client: MakeClient) -> None:
    """Input beyond the whole ITPM can never pass: a 429 marked ``x-should-retry: false``
    whose message names the limit and the request and says it can never succeed."""
    _, _, client = await make_client(itpm=5)
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(model=MODEL, max_tokens=10, messages=USER)
    assert "false" == info.value.response.headers["x-should-retry"]
    assert "rate limit of 5 input tokens per minute (" in info.value.message
    assert "requested) and can never succeed." in info.value.message


async def test_unknown_key_is_authentication_error(make_client: MakeClient) -> None:
    """With ``api_keys`` set, an unknown ``x-api-key`` is 401 ``authentication_error``."""
    _, _, client = await make_client(api_keys={"sk-other"})
    with pytest.raises(anthropic.AuthenticationError) as info:
        await client.messages.create(model=MODEL, max_tokens=10, messages=USER)
    assert isinstance(info.value.body, dict)
    assert {"type": "authentication_error", "message": "invalid x-api-key"} == info.value.body[
        "error"
    ]


async def test_scripted_429_and_overload(make_client: MakeClient) -> None:
    """Scripted faults use Anthropic's shapes: a 429 with ``retry-after``, a 529 with its own."""
    script = [Fault(nth=1, status=429, retry_after=7), Fault(nth=2, status=529, retry_after=3)]
    sim, _, client = await make_client(script=script)
    with pytest.raises(anthropic.RateLimitError) as limited:
        await client.messages.create(model=MODEL, max_tokens=10, messages=USER)
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        await client.messages.create(model=MODEL, max_tokens=10, messages=USER)
    assert ("7", "3") == (
        limited.value.response.headers["retry-after"],
        overloaded.value.response.headers["retry-after"],
    )
    assert {"anthropic": 1} == dict(sim.stats().rate_limited)


async def test_out_of_credit_is_a_non_retryable_400(make_client: MakeClient) -> None:
    """``insufficient_quota`` on Anthropic is its credit-balance 400, marked not retryable."""
    _, _, client = await make_client(insufficient_quota=True)
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(model=MODEL, max_tokens=10, messages=USER)
    assert "false" == info.value.response.headers["x-should-retry"]
    assert "credit balance is too low" in str(info.value)


async def test_unknown_model_is_not_found(make_client: MakeClient) -> None:
    """With ``reject_unknown_models`` an unlisted model is 404 ``not_found_error``."""
    _, _, client = await make_client(reject_unknown_models=True)
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(model="claude-nope", max_tokens=10, messages=USER)
    with pytest.raises(anthropic.NotFoundError):
        await client.models.retrieve("claude-nope")
