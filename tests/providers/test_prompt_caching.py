"""Provider prompt caching (#19): Anthropic's automatic ``cache_control`` on the shared
prefix, OpenAI's automatic prefix cache, their usage, prices and ITPM settlement, and
the simulator reporting both the providers' way, online and in batches.

Everything that crosses the wire goes over real HTTP: the providers (the official SDKs)
against the simulator. The simulator's prompt caches run on an injected ``FakeClock``
(online) or on the batch schedule (batches), so the TTL is tested without waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any, Literal, cast

import anthropic
import pytest

from llmbatch.batchapi import run_batch_api
from llmbatch.client import LLMClient
from llmbatch.config import BUILTIN_PROFILES, ModelProfile
from llmbatch.errors import BadRequest
from llmbatch.limits import Limits
from llmbatch.models import Request, Response, Usage
from llmbatch.providers.anthropic import (
    CACHE_MIN_TOKENS,
    DEFAULT_CACHE_MIN_TOKENS,
    AnthropicProvider,
    min_cacheable_tokens,
)
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.testing import FakeClock, Simulator
from llmbatch.testing._cache import (
    ANTHROPIC_DEFAULT_MIN_TOKENS,
    ANTHROPIC_MIN_TOKENS,
    OPENAI_MIN_TOKENS,
    OPENAI_STEP,
)
from llmbatch.testing._content import estimate_tokens
from llmbatch.testing.pytest_plugin import SimulatorFactory
from llmbatch.testing.simulator import BatchSimConfig
from llmbatch.tokens import admission_estimate

#: a model that caches prefixes of 1,024 tokens and more (and has a built-in price)
SONNET = "claude-sonnet-4-5"
HAIKU = "claude-haiku-4-5"
MINI = "gpt-4o-mini"
EPHEMERAL = {"type": "ephemeral"}
_RULES = (
    "Read the document below and answer with one short sentence that names it. Quote "
    "nothing, invent nothing, and keep every answer in plain English without markup. "
)


def instruction(tokens: int) -> str:
    """A shared instruction of ``4 * tokens`` characters: *tokens* tokens by the
    characters-per-token estimate that both the provider's check and the simulator use."""
    text = _RULES * (4 * tokens // len(_RULES) + 1)
    return text[: 4 * tokens]


INSTRUCTION = instruction(2000)
#: the tokens of the system prefix the simulator caches: the text plus its 4 of overhead
PREFIX = estimate_tokens({"system": INSTRUCTION})


def ask(doc: int, *, system: str = INSTRUCTION, model: str = SONNET, **options: Any) -> Request:
    return Request.from_prompt(f"document {doc:04d}", system=system, model=model, **options)


def anthropic_provider(sim: Simulator, **options: Any) -> AnthropicProvider:
    return AnthropicProvider(base_url=sim.url, api_key="sk-ant-test-key", **options)


def openai_provider(sim: Simulator) -> OpenAIProvider:
    return OpenAIProvider(base_url=sim.base_url, api_key="sk-test")


async def complete_each(provider: Any, requests: Sequence[Request]) -> list[Response]:
    """The requests one after another (the order decides who writes and who reads)."""
    return [await provider.complete(request) for request in requests]


# -- marking the shared prefix: what the provider sends -----------------------------------


@pytest.mark.parametrize(
    ("model", "tokens", "mode", "marked"),
    [
        (SONNET, 2000, "auto", True),
        (SONNET, 2000, "off", False),
        (SONNET, 500, "auto", False),  # Sonnet 4.5 caches 1,024+
        (SONNET, 1100, "auto", True),
        (HAIKU, 2000, "auto", False),  # Haiku 4.5 caches 4,096+
        (HAIKU, 4200, "auto", True),
        ("claude-sonnet-4-6", 1500, "auto", False),  # 2,048+
        ("claude-sonnet-4-6", 2100, "auto", True),
        ("claude-haiku-4-5-20251001", 2000, "auto", False),  # dated names match
    ],
)
async def test_auto_marks_a_system_prompt_long_enough_to_cache(
    model: str, tokens: int, mode: Literal["auto", "off"], marked: bool
) -> None:
    """With ``"auto"`` the system prompt goes as a text block with ephemeral cache_control
    when it reaches the model's minimum cacheable length; otherwise (too short, or
    ``"off"``) it goes as the plain string it always was."""
    text = instruction(tokens)
    async with AnthropicProvider(
        api_key="k", base_url="http://127.0.0.1:9", prompt_caching=mode
    ) as provider:
        params = provider.message_params(ask(1, system=text, model=model))
    expected = [{"type": "text", "text": text, "cache_control": EPHEMERAL}] if marked else text
    assert expected == params["system"]


async def test_auto_is_the_default_and_other_modes_are_refused() -> None:
    """A demanding user's default is on; a typo is a ValueError, not silence."""
    async with AnthropicProvider(api_key="k", base_url="http://127.0.0.1:9") as provider:
        assert "auto" == provider.prompt_caching
    with pytest.raises(ValueError, match="prompt_caching must be 'auto' or 'off'"):
        AnthropicProvider(api_key="k", prompt_caching="on")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "extra",
    [
        {"system": [{"type": "text", "text": INSTRUCTION, "cache_control": EPHEMERAL}]},
        {"cache_control": EPHEMERAL},
        {"tools": [{"name": "t", "input_schema": {}, "cache_control": EPHEMERAL}]},
    ],
)
async def test_a_request_that_places_cache_control_itself_is_left_alone(
    extra: dict[str, Any],
) -> None:
    """cache_control in ``extra`` (or in a message block) is the user's own placement:
    nothing is added, so the request never exceeds Anthropic's four breakpoints."""
    async with AnthropicProvider(api_key="k", base_url="http://127.0.0.1:9") as provider:
        params = provider.message_params(ask(1, extra=extra))
        blocks = [{"type": "text", "text": "doc", "cache_control": EPHEMERAL}]
        in_message = Request(
            messages=[
                {"role": "system", "content": INSTRUCTION},
                {"role": "user", "content": blocks},
            ],
            model=SONNET,
        )
        own = provider.message_params(in_message)
    assert (extra.get("system", INSTRUCTION), INSTRUCTION) == (params["system"], own["system"])


async def test_a_typed_answers_tool_counts_toward_the_cacheable_prefix() -> None:
    """The forced tool comes before the system prompt, so it is part of the cached prefix:
    800 tokens of instruction alone are too short for Sonnet 4.5, with the tool they are
    not."""
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "summary": {"type": "string"}},
        "required": ["title", "summary"],
    }
    text = instruction(800)
    async with AnthropicProvider(api_key="k", base_url="http://127.0.0.1:9") as provider:
        plain = provider.message_params(ask(1, system=text))
        typed = provider.message_params(ask(1, system=text, response_model=schema))
    assert (str, list) == (type(plain["system"]), type(typed["system"]))


async def test_batch_lines_carry_cache_control() -> None:
    """The Message Batches line is built by the same function: its params are marked."""
    async with AnthropicProvider(api_key="k", base_url="http://127.0.0.1:9") as provider:
        line = provider.batch().line("doc-0001", ask(1))
    assert {"custom_id": "doc-0001", "system": [EPHEMERAL]} == {
        "custom_id": line["custom_id"],
        "system": [block["cache_control"] for block in line["params"]["system"]],
    }


def test_the_providers_minimums_are_the_simulators() -> None:
    """The adapter and the simulator read the same documented minimums."""
    assert (CACHE_MIN_TOKENS, DEFAULT_CACHE_MIN_TOKENS) == (
        ANTHROPIC_MIN_TOKENS,
        ANTHROPIC_DEFAULT_MIN_TOKENS,
    )
    assert [4096, 2048, 1024, 1024] == [
        min_cacheable_tokens(m)
        for m in ("claude-opus-4-6", "claude-3-haiku-20240307", SONNET, "claude-opus-4-1")
    ]


# -- Anthropic over HTTP: usage, TTL, settlement, cost ------------------------------------


async def test_usage_counts_the_write_then_the_reads() -> None:
    """The first request writes the 2,004-token prefix, the next ones read it: Usage holds
    every prompt token either way, and the reads as ``cached_tokens``; the simulator's
    counters agree."""
    async with Simulator() as sim, anthropic_provider(sim) as provider:
        responses = await complete_each(provider, [ask(i) for i in range(3)])
        stats = sim.stats()
    prompts = [estimate_tokens(provider.message_params(ask(i))) for i in range(3)]
    assert [(p, c) for p, c in zip(prompts, (0, PREFIX, PREFIX), strict=True)] == [
        (r.usage.input_tokens, r.usage.cached_tokens) for r in responses
    ]
    assert [PREFIX, 0, 0] == [r.usage.cache_write_tokens for r in responses]
    assert (PREFIX, 2 * PREFIX) == (stats.cache_write_tokens, stats.cache_read_tokens)


async def test_the_message_reports_anthropics_own_cache_fields() -> None:
    """Read with the SDK: ``input_tokens`` leaves out what was written and read, the two
    cache counts and the 5-minute split are beside it."""
    async with Simulator() as sim, anthropic_provider(sim) as provider:
        client = anthropic.AsyncAnthropic(base_url=sim.url, api_key="k", max_retries=0)
        async with client:
            usages = [
                (await client.messages.create(**provider.message_params(ask(i)))).usage
                for i in range(2)
            ]
    rest = estimate_tokens(provider.message_params(ask(0))) - PREFIX
    assert [(rest, PREFIX, 0, PREFIX), (rest, 0, PREFIX, 0)] == [
        (
            u.input_tokens,
            u.cache_creation_input_tokens,
            u.cache_read_input_tokens,
            u.cache_creation.ephemeral_5m_input_tokens if u.cache_creation else None,
        )
        for u in usages
    ]


async def test_a_streamed_message_reports_the_cache_in_message_start() -> None:
    """Streaming: ``message_start`` carries the input side of the usage, cache counts
    included, as Anthropic sends it; the SDK's final message has them."""
    async with Simulator() as sim, anthropic_provider(sim) as provider:
        client = anthropic.AsyncAnthropic(base_url=sim.url, api_key="k", max_retries=0)
        async with client:
            usages = []
            for i in range(2):
                params = provider.message_params(ask(i))
                async with client.messages.stream(**params) as stream:
                    usages.append((await stream.get_final_message()).usage)
    assert [(PREFIX, 0), (0, PREFIX)] == [
        (u.cache_creation_input_tokens, u.cache_read_input_tokens) for u in usages
    ]


async def test_a_cached_prefix_expires_five_minutes_after_its_last_use() -> None:
    """On the simulator's clock: read at +299 s (which renews it), read again 299 s
    later, written again after 301 s of silence."""
    clock = FakeClock(start=100.0)
    async with Simulator(clock=clock.time) as sim, anthropic_provider(sim) as provider:
        cached: list[int] = []
        for step in (0.0, 299.0, 299.0, 301.0):
            clock.advance(step)
            cached.append((await provider.complete(ask(len(cached)))).usage.cached_tokens)
    assert [0, PREFIX, PREFIX, 0] == cached


async def test_a_one_hour_breakpoint_outlives_five_minutes() -> None:
    """``"ttl": "1h"`` placed by the user keeps the prefix for an hour."""
    clock = FakeClock(start=100.0)
    block = {"type": "text", "text": INSTRUCTION, "cache_control": EPHEMERAL | {"ttl": "1h"}}
    async with Simulator(clock=clock.time) as sim, anthropic_provider(sim) as provider:
        cached: list[int] = []
        for step in (0.0, 1800.0, 3601.0):
            clock.advance(step)
            request = ask(len(cached), extra={"system": [block]})
            cached.append((await provider.complete(request)).usage.cached_tokens)
    assert [0, PREFIX, 0] == cached


async def test_a_prefix_too_short_for_the_model_is_not_cached_even_when_marked() -> None:
    """Haiku 4.5 caches 4,096+ tokens: the provider does not mark 2,000, and a user's own
    mark on them earns nothing either (the simulator reports 0 read, 0 written)."""
    block = {"type": "text", "text": INSTRUCTION, "cache_control": EPHEMERAL}
    async with Simulator() as sim, anthropic_provider(sim) as provider:
        unmarked = await complete_each(provider, [ask(i, model=HAIKU) for i in range(2)])
        forced = await complete_each(
            provider, [ask(i, model=HAIKU, extra={"system": [block]}) for i in range(2)]
        )
        stats = sim.stats()
    assert [0, 0, 0, 0] == [r.usage.cached_tokens for r in unmarked + forced]
    assert (0, 0) == (stats.cache_read_tokens, stats.cache_write_tokens)


async def test_settlement_leaves_cache_reads_out_of_itpm_as_the_server_does() -> None:
    """What the provider settles against ITPM for each answer is exactly what the
    simulator took from its input-token bucket (its clock stands still, so nothing
    refills): the whole prompt for the write, the uncached rest for the reads."""
    clock = FakeClock(start=100.0)
    limit = 1_000_000
    async with (
        Simulator(itpm=limit, clock=clock.time) as sim,
        anthropic_provider(sim) as provider,
    ):
        requests = [ask(i) for i in range(3)]
        responses = await complete_each(provider, requests)
        settled = [
            provider.settlement(q, r)["input_tokens"]
            for q, r in zip(requests, responses, strict=True)
        ]
    remaining = [limit] + [
        int(r.headers["anthropic-ratelimit-input-tokens-remaining"]) for r in responses
    ]
    taken = [before - after for before, after in itertools.pairwise(remaining)]
    assert taken == settled
    assert [responses[0].usage.input_tokens, responses[1].usage.input_tokens - PREFIX] == (
        settled[:2]
    )


async def test_admission_leaves_out_a_prefix_the_server_lately_read() -> None:
    """Before any answer the whole prompt is reserved against ITPM; once an answer read
    the marked prefix, the next admissions leave its estimate out, for 270 s of the
    provider's clock (Anthropic keeps it 300 s from the last use); ``"off"`` never."""
    clock = FakeClock(start=100.0)
    read = Response(text="", usage=Usage(input_tokens=2200, cached_tokens=PREFIX))
    admitted = {}
    for mode in ("auto", "off"):
        provider = AnthropicProvider(api_key="k", prompt_caching=mode, clock=clock.time)
        async with provider:
            before = provider.admission(ask(1), SONNET)["input_tokens"]
            provider.settlement(ask(1), read)
            warm = provider.admission(ask(2), SONNET)["input_tokens"]
            clock.advance(271.0)
            cooled = provider.admission(ask(3), SONNET)["input_tokens"]
        admitted[mode] = (before - warm, before - cooled)
    prefix = admission_estimate([{"role": "system", "content": INSTRUCTION}], SONNET)
    assert {"auto": (prefix, 0), "off": (0, 0)} == admitted


async def test_the_client_paces_anthropic_by_the_uncached_input() -> None:
    """20 documents under ITPM 6,000 on virtual time, each prompt ~2,190 tokens: without
    caching they need more than 5 minutes of ITPM; with automatic caching the server
    leaves the reads out of ITPM and the client's limiter (settlement and header
    feedback alike) follows it, so the same job fits in the first minute's bucket.
    Neither run earns a 429. (The settlement alone is pinned by the test above.)"""
    elapsed, throttled = {}, {}
    for mode in ("auto", "off"):
        clock = FakeClock(start=100.0)
        with clock.patch_loop():
            async with (
                Simulator(itpm=6000, clock=clock.time) as sim,
                anthropic_provider(sim, prompt_caching=mode, clock=clock.time) as provider,
                LLMClient(
                    provider, model=SONNET, max_tokens=16, limits=Limits(input_tpm=6000)
                ) as client,
            ):
                result = await client.map([ask(i) for i in range(20)])
                elapsed[mode] = clock.time() - 100.0
                throttled[mode] = sim.stats().throttled
        assert 20 == len(result.ok)
    assert {"auto": 0, "off": 0} == throttled
    assert elapsed["off"] > 300.0
    assert elapsed["auto"] < 60.0


async def test_automatic_caching_costs_less_and_saves_exactly_the_reads_discount() -> None:
    """20 documents with the 2,000-token instruction through LLMClient, priced with the
    built-in Sonnet 4.5 profile: with ``"auto"`` the saving is the prefix read 19 times
    at 0.1x instead of 1x, less the one write at 1.25x instead of 1x."""
    costs = {}
    for mode in ("auto", "off"):
        async with Simulator() as sim, anthropic_provider(sim, prompt_caching=mode) as provider:
            async with LLMClient(
                provider, model=SONNET, max_tokens=16, limits=Limits(), profiles=BUILTIN_PROFILES
            ) as client:
                result = await client.map([ask(i) for i in range(20)])
            costs[mode] = sum(r.cost or 0.0 for r in result.ok)
            stats = sim.stats()
        assert 20 == len(result.ok)
        if mode == "auto":
            assert (19 * PREFIX, PREFIX) == (stats.cache_read_tokens, stats.cache_write_tokens)
    profile = BUILTIN_PROFILES[f"anthropic/{SONNET}"]
    assert profile.input_price is not None
    assert profile.cached_input_price is not None
    assert profile.cache_write_price is not None
    saving = (
        19 * PREFIX * (profile.input_price - profile.cached_input_price)
        - PREFIX * (profile.cache_write_price - profile.input_price)
    ) / 1e6
    assert costs["auto"] < costs["off"]
    assert saving == pytest.approx(costs["off"] - costs["auto"])


async def test_a_cold_prefix_is_written_once_when_many_requests_start_together() -> None:
    """50 requests with the 2,000-token instruction sent at once to a server whose cache
    entries become readable only once their request is answered (the real case): the
    first goes alone and writes the prefix, the other 49 wait for it and read it. One
    write, 49 reads; without the wait each request sent before the first answer would
    write it again."""
    async with (
        Simulator(prompt_cache_ready="answered", ttft=0.05) as sim,
        anthropic_provider(sim) as provider,
    ):
        responses = await asyncio.gather(*(provider.complete(ask(i)) for i in range(50)))
        stats = sim.stats()
    assert 50 == len(responses)
    assert (PREFIX, 49 * PREFIX) == (stats.cache_write_tokens, stats.cache_read_tokens)
    assert 1 == sum(r.usage.cache_write_tokens > 0 for r in responses)


async def test_a_server_that_caches_nothing_is_not_waited_for() -> None:
    """A server without prompt caching: the first request reports no write, so the
    others are not held back (for it or ever again): they all go at once."""
    async with (
        Simulator(prompt_cache=False, ttft=0.05) as sim,
        anthropic_provider(sim) as provider,
    ):
        first = await provider.complete(ask(0))
        responses = await asyncio.gather(*(provider.complete(ask(i)) for i in range(1, 30)))
        stats = sim.stats()
    assert 0 == first.usage.cache_write_tokens
    assert 29 == len(responses)
    assert stats.max_concurrent > 1  # they went together


async def test_more_than_four_breakpoints_are_refused_like_anthropic_does() -> None:
    """Five cache_control blocks: the simulator's 400, a BadRequest from the provider."""
    blocks = [{"type": "text", "text": f"part {i}", "cache_control": EPHEMERAL} for i in range(5)]
    async with Simulator() as sim, anthropic_provider(sim) as provider:
        with pytest.raises(BadRequest, match="A maximum of 4 blocks with cache_control") as info:
            await provider.complete(ask(1, extra={"system": blocks}))
    assert 400 == info.value.status_code


# -- OpenAI over HTTP ----------------------------------------------------------------------


def openai_cached(shared_tokens: int) -> int:
    """What OpenAI reads for a repeated prefix of *shared_tokens*: the largest step of
    128 from 1,024 that fits, or nothing below 1,024."""
    if shared_tokens < OPENAI_MIN_TOKENS:
        return 0
    return OPENAI_MIN_TOKENS + (shared_tokens - OPENAI_MIN_TOKENS) // OPENAI_STEP * OPENAI_STEP


async def test_openai_keeps_the_shared_prefix_first_and_prices_cached_tokens() -> None:
    """The system prompt leads every request, so OpenAI's automatic cache reads it from
    the second request on (in steps of 128 tokens; the shared part is the system message
    and the user message's role and ``document 00`` prefix), and the client prices those
    tokens at gpt-4o-mini's cached rate."""
    async with Simulator() as sim, openai_provider(sim) as provider:
        assert "system" == provider.chat_params(ask(1, model=MINI))["messages"][0]["role"]
        async with LLMClient(
            provider, model=MINI, max_tokens=16, limits=Limits(), profiles=BUILTIN_PROFILES
        ) as client:
            responses = [await client.complete(ask(i, model=MINI)) for i in range(3)]
        stats = sim.stats()
    shared = 4 + len(INSTRUCTION) // 4 + 4 + len("document 000") // 4
    assert [0, openai_cached(shared), openai_cached(shared)] == [
        r.usage.cached_tokens for r in responses
    ]
    assert 2 * openai_cached(shared) == stats.cache_read_tokens
    profile = BUILTIN_PROFILES[f"openai/{MINI}"]
    usage = responses[1].usage
    expected = (
        (usage.input_tokens - usage.cached_tokens) * 0.15
        + usage.cached_tokens * 0.075
        + usage.output_tokens * 0.60
    ) / 1e6
    assert 0.075 == profile.cached_input_price
    assert expected == pytest.approx(responses[1].cost)


@pytest.mark.parametrize("tokens", [1000, 1030, 1500, 4000])
async def test_openai_caches_from_1024_tokens_in_steps_of_128(tokens: int) -> None:
    """The same prompt twice: the second reads the largest 128-step prefix of it, or
    nothing when the prompt is under 1,024 tokens."""
    request = Request.from_prompt(instruction(tokens), model=MINI, max_tokens=8)
    async with Simulator() as sim, openai_provider(sim) as provider:
        first, second = await complete_each(provider, [request, request])
    prompt = estimate_tokens(provider.chat_params(request))  # the message's 4 + tokens
    assert (tokens + 4, 0, openai_cached(tokens + 4)) == (
        prompt,
        first.usage.cached_tokens,
        second.usage.cached_tokens,
    )


# -- the simulator: off switch, determinism -----------------------------------------------


async def test_a_simulator_without_prompt_caching_reports_none() -> None:
    """``prompt_cache=False``: a marked Anthropic prefix and a repeated OpenAI one are
    both paid in full, and no cache field appears."""
    async with Simulator(prompt_cache=False) as sim:
        async with anthropic_provider(sim) as claude, openai_provider(sim) as gpt:
            answers = await complete_each(claude, [ask(i) for i in range(2)])
            answers += await complete_each(gpt, [ask(i, model=MINI) for i in range(2)])
        stats = sim.stats()
    assert [0, 0, 0, 0] == [r.usage.cached_tokens for r in answers]
    assert (0, 0) == (stats.cache_read_tokens, stats.cache_write_tokens)


async def test_the_same_requests_get_the_same_cache_figures() -> None:
    """Two fresh simulators, the same 30 requests sent concurrently: the same usage
    figures. (Which request arrives first, and so writes, is the network's choice: the
    figures are compared as a multiset; one write, 29 reads.)"""
    figures = []
    for _ in range(2):
        async with (
            Simulator() as sim,
            anthropic_provider(sim) as provider,
            LLMClient(provider, model=SONNET, max_tokens=8, limits=Limits()) as client,
        ):
            result = await client.map([ask(i % 10) for i in range(30)])
        figures.append(sorted(dataclasses.astuple(r.usage) for r in result.ok))
    assert figures[0] == figures[1]
    assert 29 == sum(1 for _, _, cached, _ in figures[0] if cached == PREFIX)
    assert 1 == sum(1 for _, _, _, written in figures[0] if written == PREFIX)


# -- batches -------------------------------------------------------------------------------


async def run_batch(
    factory: SimulatorFactory, provider_of: Any, requests: list[Request], per_request: float
) -> tuple[list[Response], dict[str, int]]:
    """Run *requests* through the simulator's Batch API (1 item each *per_request* s)."""
    wall = FakeClock(start=1_700_000_000.0)
    batch = BatchSimConfig(
        validating_seconds=1.0, seconds_per_request=per_request, finalizing_seconds=1.0
    )
    sim = await factory(batch=batch, batch_clock=wall.time)
    async with provider_of(sim) as provider:
        keyed = [(f"doc-{i:04d}", request) for i, request in enumerate(requests)]
        outcomes = await run_batch_api(
            provider.batch(), keyed, poll_interval=60.0, sleep=wall.sleep
        )
    answers = [outcomes[key] for key, _ in keyed]
    assert all(isinstance(a, Response) for a in answers), answers
    return cast(list[Response], answers), dict(sim.stats().batch)


async def test_anthropic_batch_results_report_the_write_then_reads(
    simulator_factory: SimulatorFactory,
) -> None:
    """A message batch of 5: the first request (in input order) writes the prefix, the
    others read it, in the results and in the backend's counters."""
    answers, counters = await run_batch(
        simulator_factory, anthropic_provider, [ask(i) for i in range(5)], 0.125
    )
    assert [0, PREFIX, PREFIX, PREFIX, PREFIX] == [a.usage.cached_tokens for a in answers]
    assert (PREFIX, 4 * PREFIX) == (
        counters["batch_cache_write_tokens"],
        counters["batch_cache_read_tokens"],
    )


async def test_a_batch_too_slow_for_the_ttl_writes_every_time(
    simulator_factory: SimulatorFactory,
) -> None:
    """Items 400 s apart on the batch schedule outlive the 5-minute cache: each writes."""
    answers, counters = await run_batch(
        simulator_factory, anthropic_provider, [ask(i) for i in range(3)], 400.0
    )
    assert [0, 0, 0] == [a.usage.cached_tokens for a in answers]
    assert (3 * PREFIX, 0) == (
        counters["batch_cache_write_tokens"],
        counters["batch_cache_read_tokens"],
    )


async def test_openai_batch_results_report_cached_tokens(
    simulator_factory: SimulatorFactory,
) -> None:
    """An OpenAI batch of 3 with the shared instruction: the later two read it."""
    answers, counters = await run_batch(
        simulator_factory, openai_provider, [ask(i, model=MINI) for i in range(3)], 0.125
    )
    shared = 4 + len(INSTRUCTION) // 4 + 4 + len("document 000") // 4
    assert [0, openai_cached(shared), openai_cached(shared)] == [
        a.usage.cached_tokens for a in answers
    ]
    assert 2 * openai_cached(shared) == counters["batch_cache_read_tokens"]


# -- prices ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cached", "write"),
    [
        ("openai/gpt-4o-mini", 0.075, None),
        ("openai/gpt-4o", 1.25, None),
        ("openai/gpt-4.1-mini", 0.10, None),
        ("openai/gpt-4.1", 0.50, None),
        ("anthropic/claude-haiku-4-5", 0.10, 1.25),
        ("anthropic/claude-sonnet-4-5", 0.30, 3.75),
    ],
)
def test_builtin_profiles_price_the_prompt_cache(
    name: str, cached: float, write: float | None
) -> None:
    """OpenAI reads at its listed cached rate and writes for free; Anthropic reads at
    0.1x and writes (5-minute cache) at 1.25x the input price."""
    profile = BUILTIN_PROFILES[name]
    assert (cached, write) == (profile.cached_input_price, profile.cache_write_price)


def test_cost_prices_cache_writes_at_the_write_rate() -> None:
    """Of the input tokens, those read from the cache cost the cached rate, those written
    to it the write rate, the rest the input price."""
    profile = ModelProfile(
        provider="anthropic",
        model="m",
        input_price=3.0,
        output_price=15.0,
        cached_input_price=0.3,
        cache_write_price=3.75,
    )
    written = Usage(input_tokens=3_000_000, cached_tokens=1_000_000, cache_write_tokens=1_000_000)
    read_only = Usage(input_tokens=3_000_000, cached_tokens=1_000_000)
    assert pytest.approx([3.0 + 0.3 + 3.75, 6.0 + 0.3]) == [
        profile.cost(written),
        profile.cost(read_only),
    ]
