"""What each provider charges the limiter before a request (admission) and corrects it
with afterwards (settlement), as tables over Request/Response/Usage objects.

Nothing is sent: the providers point at 127.0.0.1:9 with fake keys, and every socket
connection is refused while these tests run.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from anthropic.types import Message, TextBlock
from anthropic.types import Usage as AnthropicUsage

from llmbatch.errors import BadRequest
from llmbatch.models import Embedding, EmbeddingRequest, Request, Response, Usage
from llmbatch.providers import anthropic as anthropic_provider
from llmbatch.providers import openai as openai_provider
from llmbatch.providers.anthropic import AnthropicProvider, message_response
from llmbatch.providers.openai import OpenAIProvider

OPENAI_DEFAULT = openai_provider.DEFAULT_MAX_TOKENS
ANTHROPIC_DEFAULT = anthropic_provider.DEFAULT_MAX_TOKENS
CLAUDE = "claude-haiku-4-5"
CJK = "你好世界" * 10  # 40 characters, 27 tokens for gpt-4o: chars/4 undercounts it


@pytest.fixture(autouse=True)
def _refuse_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket connection fails the test: admission and settlement are arithmetic."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an admission/settlement test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
async def openai_side() -> AsyncIterator[OpenAIProvider]:
    async with OpenAIProvider(api_key="sk-test", base_url="http://127.0.0.1:9/v1") as provider:
        yield provider


def user(content: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def answer(input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> Response:
    usage = Usage(
        input_tokens=input_tokens, output_tokens=output_tokens, cached_tokens=cached_tokens
    )
    return Response(text="ok", usage=usage)


# -- OpenAI ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "model", "expected"),
    [
        # openai_admission_estimate("hello world") = ceil(11/4) + 4 = 7
        (Request(messages=user("hello world"), max_tokens=100), "gpt-4o", 7 + 100),
        (Request(messages=user("hello world"), max_tokens=100), "gpt-3.5-turbo", 7 + 100),
        (Request(messages=user("hello world"), max_tokens=50, n=3), "gpt-4o", 7 + 50 * 3),
        (Request(messages=user("hello world")), "gpt-4o", 7 + OPENAI_DEFAULT),
        (Request(messages=user("hello world"), n=2), "gpt-4o", 7 + OPENAI_DEFAULT * 2),
        # two messages: ceil(40/4) + ceil(41/4) + 2 x 4
        (
            Request(
                messages=[
                    {"role": "system", "content": "a" * 40},
                    {"role": "user", "content": "b" * 41},
                ],
                max_tokens=10,
            ),
            "gpt-4o",
            10 + 11 + 8 + 10,
        ),
        # character-based, as OpenAI documents, even where the tokenizer counts 27
        (Request(messages=user(CJK), max_tokens=100), "gpt-4o", 10 + 4 + 100),
    ],
    ids=["max_tokens", "other-model", "n", "default", "default-n", "system", "cjk"],
)
async def test_openai_admission_charges_prompt_estimate_plus_max_tokens_times_n(
    openai_side: OpenAIProvider, request_: Request, model: str, expected: int
) -> None:
    """OpenAI is charged one request and prompt estimate + max_tokens x n TPM tokens
    (the default max_tokens when the request sets none), nothing per input/output."""
    assert {"requests": 1, "tokens": expected} == openai_side.admission(request_, model)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello world", 3 + 1),  # ceil(11/4) + 1
        ("a" * 400, 100 + 1),
        (CJK, 10 + 1),
    ],
    ids=["short", "long", "cjk"],
)
async def test_openai_embedding_admission_is_the_input_estimate(
    openai_side: OpenAIProvider, text: str, expected: int
) -> None:
    """An embedding is charged one request and its input's character estimate, no output."""
    request = EmbeddingRequest(input=text, model="text-embedding-3-small")
    assert {"requests": 1, "tokens": expected} == openai_side.admission(
        request, "text-embedding-3-small"
    )


@pytest.mark.parametrize(
    ("request_", "usage", "expected"),
    [
        # the prompt the server counted equals the estimate (7): only the output varies
        (Request(messages=user("hello world"), max_tokens=100), (7, 3), 7 + 100),
        (Request(messages=user("hello world"), max_tokens=100), (7, 100), 7 + 100),
        (Request(messages=user("hello world"), max_tokens=50, n=3), (7, 12), 7 + 50 * 3),
        (Request(messages=user("hello world")), (7, 40), 7 + OPENAI_DEFAULT),
    ],
    ids=["short-answer", "full-answer", "n", "default"],
)
async def test_openai_settlement_keeps_the_output_reservation(
    openai_side: OpenAIProvider, request_: Request, usage: tuple[int, int], expected: int
) -> None:
    """A short answer refunds nothing: OpenAI keeps max_tokens x n whatever the output, so
    the settled charge is the admission charge; no request or ITPM/OTPM unit is settled."""
    settled = openai_side.settlement(request_, answer(*usage))
    assert ({"tokens": expected}, expected) == (
        settled,
        openai_side.admission(request_, "gpt-4o")["tokens"],
    )


@pytest.mark.parametrize(
    ("request_", "usage"),
    [
        # estimate ceil(40/4) + 4 = 14; the server's prompt_tokens for gpt-4o: 27
        (Request(messages=user(CJK), max_tokens=100), (27, 5)),
        # estimate ceil(400/4) + 4 = 104; prompt_tokens: 57
        (Request(messages=user("a" * 400), max_tokens=100), (57, 5)),
    ],
    ids=["tokenizer-above-estimate", "tokenizer-below-estimate"],
)
async def test_openai_settlement_equals_admission_when_prompt_count_differs(
    openai_side: OpenAIProvider, request_: Request, usage: tuple[int, int]
) -> None:
    """The settled TPM charge is what OpenAI charged at admission (it keeps the
    reservation), even when the response's prompt_tokens differ from the estimate."""
    admitted = openai_side.admission(request_, "gpt-4o")["tokens"]
    assert {"tokens": admitted} == openai_side.settlement(request_, answer(*usage))


async def test_openai_embedding_settlement_equals_admission(
    openai_side: OpenAIProvider,
) -> None:
    """An embedding's settled TPM charge is its admission charge (ceil(40/4) + 1 = 11),
    not the 20 input tokens the response reports."""
    request = EmbeddingRequest(input=CJK, model="text-embedding-3-small")
    admitted = openai_side.admission(request, "text-embedding-3-small")["tokens"]
    embedding = Embedding(vector=(0.0,), usage=Usage(input_tokens=20))
    assert {"tokens": admitted} == openai_side.settlement(request, embedding)


async def test_openai_embedding_settlement_when_usage_matches_the_estimate(
    openai_side: OpenAIProvider,
) -> None:
    """An embedding settles only TPM tokens, at the admitted amount when usage agrees."""
    request = EmbeddingRequest(input="hello world", model="text-embedding-3-small")
    embedding = Embedding(vector=(0.0,), usage=Usage(input_tokens=4))
    assert {"tokens": 4} == openai_side.settlement(request, embedding)


# -- Anthropic ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "reserve_output", "expected"),
    [
        # admission_estimate("hello world") = max(tokenizer 9, ceil(11/4) + 3 + 3 = 9)
        (Request(messages=user("hello world"), max_tokens=100), True, (9, 100)),
        (Request(messages=user("hello world")), True, (9, ANTHROPIC_DEFAULT)),
        (Request(messages=user("hello world"), max_tokens=100), False, (9, 0)),
        (Request(messages=user("hello world")), False, (9, 0)),
        # the system prompt is input too: 19 (tokenizer) instead of 9
        (
            Request.from_prompt("hello world", system="Answer in French, briefly.", max_tokens=64),
            True,
            (19, 64),
        ),
        # a long system prompt: characters win, ceil(411/4) + 2 x 3 + 3 = 112
        (
            Request.from_prompt("hello world", system="a" * 400, max_tokens=64),
            False,
            (112, 0),
        ),
    ],
    ids=[
        "reserve",
        "reserve-default",
        "no-reserve",
        "no-reserve-default",
        "system",
        "long-system-no-reserve",
    ],
)
async def test_anthropic_admission_splits_input_and_output(
    request_: Request, reserve_output: bool, expected: tuple[int, int]
) -> None:
    """Anthropic is charged one request, the input estimate (system prompt included)
    against ITPM and, only with reserve_output, max_tokens against OTPM; no TPM tokens."""
    input_tokens, output_tokens = expected
    async with AnthropicProvider(
        api_key="sk-ant-test", base_url="http://127.0.0.1:9", reserve_output=reserve_output
    ) as provider:
        admitted = provider.admission(request_, CLAUDE)
    assert {
        "requests": 1,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
    } == admitted


@pytest.mark.parametrize("reserve_output", [True, False], ids=["reserve", "no-reserve"])
@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ((120, 37, 0), (120, 37)),
        ((9, 100, 0), (9, 100)),
        # cache reads do not count toward ITPM (PROTOCOLS.md): of 5,120 prompt tokens,
        # 5,000 were read from the cache
        ((5120, 37, 5000), (120, 37)),
    ],
    ids=["short", "full", "cache-read"],
)
async def test_anthropic_settlement_reports_actual_input_and_output(
    reserve_output: bool, usage: tuple[int, int, int], expected: tuple[int, int]
) -> None:
    """Settlement reports the actual uncached input (ITPM) and output (OTPM), whatever was
    reserved: with reserve_output=False the whole output is charged only now."""
    request = Request(messages=user("hello world"), max_tokens=100)
    input_tokens, output_tokens = expected
    async with AnthropicProvider(
        api_key="sk-ant-test", base_url="http://127.0.0.1:9", reserve_output=reserve_output
    ) as provider:
        settled = provider.settlement(request, answer(*usage))
    assert {"input_tokens": input_tokens, "output_tokens": output_tokens} == settled


def claude_message(*, input_tokens: int, cache_write: int, cache_read: int) -> Message:
    return Message(
        id="msg_1",
        type="message",
        role="assistant",
        model=CLAUDE,
        content=[TextBlock(type="text", text="ok")],
        stop_reason="end_turn",
        stop_sequence=None,
        usage=AnthropicUsage(
            input_tokens=input_tokens,
            output_tokens=37,
            cache_creation_input_tokens=cache_write,
            cache_read_input_tokens=cache_read,
        ),
    )


async def test_anthropic_settlement_of_a_real_message_skips_cache_reads() -> None:
    """From an SDK Message, cache reads are left out of the ITPM settlement."""
    request = Request(messages=user("hello world"), max_tokens=100)
    message = claude_message(input_tokens=120, cache_write=0, cache_read=5000)
    response = message_response(message, request, request_id="req_1")
    async with AnthropicProvider(api_key="sk-ant-test", base_url="http://127.0.0.1:9") as provider:
        settled = provider.settlement(request, response)
    assert ({"input_tokens": 120, "output_tokens": 37}, 5000) == (
        settled,
        response.usage.cached_tokens,
    )


async def test_anthropic_settlement_counts_cache_writes_toward_itpm() -> None:
    """A message that wrote 2000 tokens to the cache settles 120 + 2000 ITPM tokens."""
    request = Request(messages=user("hello world"), max_tokens=100)
    message = claude_message(input_tokens=120, cache_write=2000, cache_read=0)
    response = message_response(message, request, request_id="req_1")
    async with AnthropicProvider(api_key="sk-ant-test", base_url="http://127.0.0.1:9") as provider:
        settled = provider.settlement(request, response)
    assert {"input_tokens": 120 + 2000, "output_tokens": 37} == settled


async def test_anthropic_usage_counts_every_prompt_token_and_the_cached_part() -> None:
    """From an SDK Message with cache reads and writes, Usage holds every prompt token
    (120 + 2,000 written + 5,000 read) with the 5,000 read as cached, so cost prices
    the reads at the cached rate, and ITPM is settled with the 2,120 uncached."""
    request = Request(messages=user("hello world"), max_tokens=100)
    message = claude_message(input_tokens=120, cache_write=2000, cache_read=5000)
    response = message_response(message, request, request_id="req_1")
    async with AnthropicProvider(api_key="sk-ant-test", base_url="http://127.0.0.1:9") as provider:
        settled = provider.settlement(request, response)
    assert (7120, 5000) == (response.usage.input_tokens, response.usage.cached_tokens)
    assert {"input_tokens": 2120, "output_tokens": 37} == settled


async def test_anthropic_refuses_more_than_one_completion_per_request() -> None:
    """The Messages API has no ``n``: n=2 is a clear BadRequest, not one answer charged
    (and reserved) as two."""
    async with AnthropicProvider(api_key="sk-ant-test", base_url="http://127.0.0.1:9") as provider:
        with pytest.raises(BadRequest, match="one completion per request, not n=2"):
            provider.message_params(Request(messages=user("hi"), model=CLAUDE, n=2))
