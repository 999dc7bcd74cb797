"""The OpenAI batch backend on OpenAI-compatible servers (Groq, Together...): their
provider profiles' limits, windows and discounts, and ``mode="auto"`` knowing which
servers have a Batch API. Against the simulator's ``/v1/files`` + ``/v1/batches``, whose
batches run on a FakeClock that the lifecycle's ``sleep`` advances.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmbatch.client import LLMClient
from llmbatch.config import BUILTIN_PROVIDERS, load_providers, provider_profile
from llmbatch.models import Request, Response
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.routing import has_batch_api
from llmbatch.testing import FakeClock, Simulator
from llmbatch.testing.pytest_plugin import SimulatorFactory
from llmbatch.testing.simulator import BatchSimConfig

START = 1_700_000_000.0
MODEL = "llama-3.1-8b-instant"
PRICES = {"input_price": 0.05, "output_price": 0.08}


async def batch_sim(factory: SimulatorFactory, wall: FakeClock) -> Simulator:
    return await factory(
        batch=BatchSimConfig(validating_seconds=1.0, seconds_per_request=0.125),
        batch_clock=wall.time,
    )


def prompts(n: int) -> list[Request]:
    return [Request.from_prompt(f"document {i:04d}", model=MODEL) for i in range(n)]


@pytest.mark.parametrize(("name", "discount"), [("groq", 0.25), ("together", 0.5)])
async def test_a_profiled_server_runs_batches_at_its_discount(
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    discount: float,
) -> None:
    """A server named by a provider profile with a Batch API: ``mode="auto"`` sends a
    big job there, in batches under the profile's file limits, and each answer costs
    the model's price less the provider's discount."""
    monkeypatch.setenv("LLMBATCH_PROFILES", json.dumps({f"{name}/{MODEL}": PRICES}))
    wall = FakeClock(start=START)
    sim = await batch_sim(simulator_factory, wall)
    async with OpenAIProvider(base_url=sim.base_url, api_key="sk-test", name=name) as provider:
        backend = provider.batch()
        client = LLMClient(provider, model=MODEL, max_tokens=16, sleep=wall.sleep)
        client.batch_poll_interval = 60.0
        result = await client.map(prompts(120), mode="auto", prefer="cost")
        await client.release()
    profile = BUILTIN_PROVIDERS[name]
    assert discount == client.profile(MODEL).batch_discount
    assert (profile.batch_max_requests, profile.batch_max_bytes, "24h") == (
        backend.limits.max_requests,
        backend.limits.max_bytes,
        backend.completion_window,
    )
    stats = sim.stats()
    assert (1, 120, 0) == (
        stats.batch["openai_batches_created"],
        stats.batch["batch_requests_completed"],
        stats.responses.get(200, 0),  # nothing went online
    )
    answers = [r for r in result.ok if isinstance(r, Response)]
    assert 120 == len(answers)
    for answer in answers:
        usage = answer.usage
        online = (usage.input_tokens * 0.05 + usage.output_tokens * 0.08) / 1_000_000
        assert answer.cost == pytest.approx(online * (1 - discount))


async def test_a_server_without_a_batch_profile_goes_online(
    simulator_factory: SimulatorFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A URL provider whose name has no profile saying it has batches: ``mode="auto"``
    answers online however big the job; ``mode="batch"`` is refused. A ``[providers]``
    table that says ``batch = true`` gives it one."""
    monkeypatch.chdir(tmp_path)
    sim = await simulator_factory()
    async with OpenAIProvider(base_url=sim.base_url, api_key="sk-test", name="my-vllm") as p:
        client = LLMClient(p, model=MODEL, max_tokens=16)
        result = await client.map(prompts(150), mode="auto", prefer="cost")
        with pytest.raises(ValueError, match="the my-vllm provider has no Batch API"):
            await client.map(prompts(150), mode="batch")
        await client.release()
    stats = sim.stats()
    assert (150, 150, 0) == (len(result.ok), stats.responses[200], stats.batches_created)
    assert (False, False) == (p.has_batch_api, has_batch_api(p))

    (tmp_path / "llmbatch.toml").write_text(
        "[providers.my-vllm]\nbatch = true\nbatch_discount = 0.0\nbatch_max_requests = 100\n"
    )
    profile = provider_profile("my-vllm", providers=load_providers())
    async with OpenAIProvider(base_url=sim.base_url, api_key="sk-test", name="my-vllm") as q:
        assert (True, 100, 0.0) == (
            has_batch_api(q),
            q.batch().limits.max_requests,
            profile.batch_discount,
        )


async def test_a_known_base_url_names_its_provider() -> None:
    """Pointed at Groq's, Together's or Fireworks' URL, the provider takes their name
    (and so their profiles); any other server is "openai" unless named."""
    named = {}
    for name in ("groq", "together", "fireworks", "openai"):
        url = BUILTIN_PROVIDERS[name].base_url
        async with OpenAIProvider(base_url=url, api_key="sk-test") as provider:
            named[name] = (provider.name, provider.has_batch_api)
    async with OpenAIProvider(base_url="http://127.0.0.1:9/v1", api_key="sk-test") as other:
        named["other"] = (other.name, other.has_batch_api)
    assert {
        "groq": ("groq", True),
        "together": ("together", True),
        "fireworks": ("fireworks", True),
        "openai": ("openai", True),
        "other": ("openai", True),
    } == named


def test_provider_tables_are_checked() -> None:
    """Unknown settings and wrong types in a ``[providers]`` table are refused."""
    from llmbatch.config import _providers_from

    with pytest.raises(ValueError, match="unknown settings for provider 'x'"):
        _providers_from({"providers": {"x": {"batches": True}}})
    with pytest.raises(ValueError, match="batch for provider 'x' must be a bool"):
        _providers_from({"providers": {"x": {"batch": "yes"}}})
    with pytest.raises(ValueError, match="batch_discount for provider 'x'"):
        _providers_from({"providers": {"x": {"batch_discount": 1.5}}})
    assert (
        0.3
        == _providers_from({"providers": {"groq": {"batch_discount": 0.3}}})["groq"].batch_discount
    )


async def test_groqs_daily_request_headers_do_not_pace_per_minute() -> None:
    """Groq's ``x-ratelimit-*-requests`` count requests per day: a Groq-named server's
    responses leave them out (its token headers stay), so a client learning its limits
    from the headers paces tokens per minute and never takes 14,400 requests a day for
    14,400 a minute."""
    from llmbatch.limits import Limits

    async with Simulator(rpm=14_400, tpm=6_000) as sim:
        groq = OpenAIProvider(base_url=sim.base_url, api_key="gsk-test", name="groq")
        plain = OpenAIProvider(base_url=sim.base_url, api_key="sk-test")
        async with LLMClient(groq, model="llama-3.1-8b-instant", limits=Limits.auto()) as client:
            response = await client.complete(Request.from_prompt("hello", max_tokens=8))
            learned = client.limiter_for("llama-3.1-8b-instant").statistics().limits
        async with plain:
            other = await plain.complete(
                Request.from_prompt("hello", model="gpt-4o-mini", max_tokens=8)
            )
    assert "x-ratelimit-limit-requests" not in {k.lower() for k in response.headers}
    assert "x-ratelimit-limit-tokens" in {k.lower() for k in response.headers}
    assert "x-ratelimit-limit-requests" in {k.lower() for k in other.headers}
    assert "rpm" not in learned
    assert 6_000 == round(learned["tpm"])
