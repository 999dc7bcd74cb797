"""The simulator's OpenAI endpoints, driven by the official ``openai`` client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from llmbatch.testing import Simulator
from llmbatch.testing._content import content_tag
from llmbatch.testing.pytest_plugin import SimulatorFactory

PROMPT = "Summarize the plot of Hamlet."
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]


@pytest.fixture
async def client(simulator: Simulator) -> AsyncIterator[openai.AsyncOpenAI]:
    """An OpenAI client on the default simulator, without SDK retries."""
    async with openai.AsyncOpenAI(
        base_url=simulator.base_url, api_key="sk-test", max_retries=0
    ) as client:
        yield client


async def test_chat_completion_is_tagged_with_its_input(client: openai.AsyncOpenAI) -> None:
    """The answer carries the tag of the last user message and a consistent usage."""
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    text = completion.choices[0].message.content
    assert text is not None
    assert text.startswith(f"[{content_tag(PROMPT)}]")
    assert completion.usage is not None
    assert len(text.split(" ")) == completion.usage.completion_tokens
    assert (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
        == completion.usage.total_tokens
    )
    assert "gpt-4o-mini" == completion.model
    assert "stop" == completion.choices[0].finish_reason


async def test_chat_completion_is_deterministic(client: openai.AsyncOpenAI) -> None:
    """The same request gets the same text; another request gets another tag."""
    first = await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    again = await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    other = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Something else"}]
    )
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.id != again.id
    assert first.choices[0].message.content != other.choices[0].message.content


async def test_max_tokens_truncates_the_answer(client: openai.AsyncOpenAI) -> None:
    """``max_tokens`` bounds the completion and the finish reason says ``length``."""
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=USER, max_tokens=3
    )
    assert completion.usage is not None
    assert 3 == completion.usage.completion_tokens
    assert "length" == completion.choices[0].finish_reason


async def test_n_choices(client: openai.AsyncOpenAI) -> None:
    """``n`` gives n indexed choices, and usage counts every one."""
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=USER, n=3)
    assert [0, 1, 2] == [choice.index for choice in completion.choices]
    assert completion.usage is not None
    per_choice = len((completion.choices[0].message.content or "").split(" "))
    assert 3 * per_choice == completion.usage.completion_tokens


async def test_embeddings(client: openai.AsyncOpenAI) -> None:
    """One unit vector per input, a deterministic function of the input."""
    result = await client.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta", "alpha"]
    )
    vectors = [item.embedding for item in result.data]
    assert [0, 1, 2] == [item.index for item in result.data]
    assert vectors[0] == vectors[2] != vectors[1]
    assert 1.0 == pytest.approx(sum(x * x for x in vectors[0]), abs=1e-4)
    assert result.usage.prompt_tokens == result.usage.total_tokens > 0


async def test_models_list_and_retrieve(simulator_factory: SimulatorFactory) -> None:
    """``GET /v1/models`` lists the configured models; an unknown one is a 404."""
    sim = await simulator_factory(models=("gpt-a", "gpt-b"))
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk", max_retries=0) as client:
        page = await client.models.list()
        assert ["gpt-a", "gpt-b"] == [model.id for model in page.data]
        assert "gpt-b" == (await client.models.retrieve("gpt-b")).id
        with pytest.raises(openai.NotFoundError) as info:
            await client.models.retrieve("gpt-z")
    assert "model_not_found" == info.value.code


async def test_streaming_with_usage_chunk(client: openai.AsyncOpenAI) -> None:
    """SSE chunks rebuild the same text; ``include_usage`` adds a final usage-only chunk."""
    full = await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.choices[0].message.content == text
    assert "assistant" == chunks[0].choices[0].delta.role
    assert "stop" == chunks[-2].choices[0].finish_reason
    assert [] == chunks[-1].choices
    assert full.usage == chunks[-1].usage
    assert all(c.usage is None for c in chunks[:-1])


async def test_streaming_without_usage(client: openai.AsyncOpenAI) -> None:
    """Without ``include_usage`` no chunk carries usage, and n>1 streams every choice."""
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True, n=2, max_tokens=4
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks]
    assert [(0, "length"), (1, "length")] == [f for f in finishes if f[1]]


async def test_request_id_and_processing_headers(client: openai.AsyncOpenAI) -> None:
    """Every answer carries ``x-request-id`` and ``openai-processing-ms``; no limit headers
    when no limit is configured."""
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER)
    assert raw.headers["x-request-id"].startswith("req_")
    assert int(raw.headers["openai-processing-ms"]) >= 0
    assert "x-ratelimit-limit-requests" not in raw.headers
    assert raw.parse().id.startswith("chatcmpl-")


def _bad_request(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": USER}
    body.update(changes)
    return {key: value for key, value in body.items() if value is not None}


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": USER}, None, None),
        (_bad_request(messages=[]), "messages", "empty_array"),
        (
            _bad_request(messages=[{"role": "wizard", "content": "x"}]),
            "messages[0].role",
            "invalid_value",
        ),
        (_bad_request(messages="hi"), "messages", "invalid_type"),
        (_bad_request(max_tokens=0), "max_tokens", "integer_below_min_value"),
        (
            _bad_request(max_completion_tokens=-5),
            "max_completion_tokens",
            "integer_below_min_value",
        ),
        (_bad_request(max_tokens="ten"), "max_tokens", "invalid_type"),
        (_bad_request(n=0), "n", "integer_below_min_value"),
        (_bad_request(n=129), "n", "integer_above_max_value"),
        (_bad_request(max_tokens=200_000), "messages", "context_length_exceeded"),
    ],
)
async def test_validation_errors(
    client: openai.AsyncOpenAI, body: dict[str, Any], param: str | None, code: str | None
) -> None:
    """Invalid requests get OpenAI's 400 shape with the offending ``param`` and ``code``."""
    with pytest.raises(openai.BadRequestError) as info:
        await client.post("/chat/completions", body=body, cast_to=object)
    assert (param, code, "invalid_request_error") == (
        info.value.param,
        info.value.code,
        info.value.type,
    )


async def test_missing_messages_parameter(client: openai.AsyncOpenAI) -> None:
    """A body without ``messages`` names the missing parameter."""
    with pytest.raises(openai.BadRequestError) as info:
        await client.post("/chat/completions", body={"model": "gpt-4o-mini"}, cast_to=object)
    assert ("messages", "missing_required_parameter") == (info.value.param, info.value.code)


async def test_context_window_is_configurable(simulator_factory: SimulatorFactory) -> None:
    """A prompt plus max_tokens beyond ``context_window`` is ``context_length_exceeded``."""
    sim = await simulator_factory(context_window=50)
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk", max_retries=0) as client:
        await client.chat.completions.create(model="m", messages=USER, max_tokens=30)
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=USER, max_tokens=50)
    assert "context_length_exceeded" == info.value.code
    assert "maximum context length is 50 tokens" in info.value.message


async def test_malformed_json_body(client: openai.AsyncOpenAI) -> None:
    """A body that is not a JSON object is a 400 saying so."""
    with pytest.raises(openai.BadRequestError) as info:
        await client.post(
            "/chat/completions",
            content=b"{not json",
            options={"headers": {"Content-Type": "application/json"}},
            cast_to=object,
        )
    assert "could not parse the JSON body" in info.value.message


async def test_embeddings_need_input(client: openai.AsyncOpenAI) -> None:
    """Embeddings without ``input`` are a 400 naming it."""
    with pytest.raises(openai.BadRequestError) as info:
        await client.post("/embeddings", body={"model": "text-embedding-3-small"}, cast_to=object)
    assert "input" == info.value.param


async def test_unknown_models_rejected_when_asked(simulator_factory: SimulatorFactory) -> None:
    """With ``reject_unknown_models`` a model outside ``models`` is 404 ``model_not_found``."""
    sim = await simulator_factory(reject_unknown_models=True)
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="gpt-99", messages=USER)
        await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert "model_not_found" == info.value.code


async def test_missing_api_key_is_401(simulator: Simulator) -> None:
    """No Authorization header: 401 in OpenAI's shape (the SDK needs *a* key, so send none)."""
    async with openai.AsyncOpenAI(
        base_url=simulator.base_url, api_key="unused", max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=USER, extra_headers={"Authorization": ""}
            )
    assert "invalid_request_error" == info.value.type
    assert "didn't provide an API key" in info.value.message


async def test_unknown_api_key_is_401_and_never_echoed(simulator_factory: SimulatorFactory) -> None:
    """With ``api_keys`` set, another key is ``invalid_api_key``; the body never shows it."""
    sim = await simulator_factory(api_keys={"sk-good"})
    async with (
        openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-secret-123", max_retries=0) as bad,
        openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-good", max_retries=0) as good,
    ):
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.chat.completions.create(model="gpt-4o-mini", messages=USER)
        await good.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert "invalid_api_key" == info.value.code
    assert "sk-secret" not in info.value.response.text
    assert "sk-good" not in repr(sim)


@pytest.mark.parametrize(
    ("limits", "max_tokens", "unit"),
    [
        ({"tpm": 1000}, 5000, "tokens per min (TPM): Limit 1000, Requested "),
        ({"tpd": 1000}, 5000, "tokens per day (TPD): Limit 1000, Requested "),
    ],
)
async def test_request_too_large_is_sent_as_openai_sends_it(
    simulator_factory: SimulatorFactory, limits: dict[str, int], max_tokens: int, unit: str
) -> None:
    """More than a whole bucket is OpenAI's "Request too large" 429: type and code as for
    a rate limit, the bucket and numbers in the message, and neither ``retry-after`` nor
    ``x-should-retry: false`` (real servers do not reliably send it: only the message
    says the request can never pass)."""
    sim = await simulator_factory(**limits)
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk", max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=USER, max_tokens=max_tokens
            )
    error = info.value
    assert isinstance(error.body, dict)
    message = str(error.body["message"])
    assert ("tokens", "rate_limit_exceeded") == (error.type, error.code)
    assert message.startswith("Request too large for gpt-4o-mini in organization")
    assert unit in message
    assert "x-should-retry" not in error.response.headers
    assert "retry-after" not in error.response.headers
