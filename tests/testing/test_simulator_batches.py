"""The simulator's Batch APIs (``llmbatch.testing._batchsim``), driven by the official clients.

Every test serves a fresh ``BatchBackend`` on 127.0.0.1 with a ``FakeClock`` as its clock
and steps through the batch lifecycle by advancing that clock; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from anthropic.types.messages import MessageBatch
from openai.types import Batch, FilePurpose

from llmbatch.testing import _batchsim
from llmbatch.testing._batchsim import BatchBackend, BatchSimConfig
from llmbatch.testing._content import content_tag, embeddings_response, estimate_tokens
from llmbatch.testing.clock import FakeClock

START = 1_700_000_000.0
MODEL = "gpt-4o-mini"
CLAUDE = "claude-sonnet-4-5"
EXPIRED = "This request could not be executed before the completion window expired."
#: a fast, round-numbered schedule: validating 10 s, 1 s per request, finalizing 5 s
FAST = {
    "validating_seconds": 10.0,
    "seconds_per_request": 1.0,
    "finalizing_seconds": 5.0,
    "cancel_seconds": 3.0,
}


@dataclass
class Sim:
    """One served backend, its clock and a client for each API."""

    backend: BatchBackend
    clock: FakeClock
    root: str
    openai: openai.AsyncOpenAI
    anthropic: anthropic.AsyncAnthropic


MakeSim = Callable[..., Awaitable[Sim]]


@pytest.fixture
async def make_sim() -> AsyncIterator[MakeSim]:
    """Serve a backend with ``BatchSimConfig(**FAST | overrides)``; cleaned up after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**overrides: Any) -> Sim:
            clock = FakeClock(start=START)
            backend = BatchBackend(BatchSimConfig(**(FAST | overrides)), clock=clock)
            app = web.Application()
            backend.add_routes(app)
            runner = web.AppRunner(app)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            root = f"http://{host}:{port}"
            oai = openai.AsyncOpenAI(base_url=f"{root}/v1", api_key="sk-test", max_retries=0)
            stack.push_async_callback(oai.close)
            ant = anthropic.AsyncAnthropic(base_url=root, api_key="sk-ant-test", max_retries=0)
            stack.push_async_callback(ant.close)
            return Sim(backend, clock, root, oai, ant)

        yield make


@pytest.fixture
async def sim(make_sim: MakeSim) -> Sim:
    """A backend with the ``FAST`` schedule."""
    return await make_sim()


# ----------------------------------------------------------------------------------------
# helpers


def chat_line(custom_id: str, text: str, *, model: str = MODEL, **body: Any) -> dict[str, Any]:
    """One input line for ``/v1/chat/completions``."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def chat_lines(n: int) -> list[dict[str, Any]]:
    return [chat_line(f"r-{i}", f"question number {i}") for i in range(n)]


def jsonl(lines: Sequence[dict[str, Any] | str]) -> bytes:
    return b"".join(
        (line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines
    )


async def submit(
    sim: Sim,
    lines: Sequence[dict[str, Any] | str],
    endpoint: str = "/v1/chat/completions",
    **extra: Any,
) -> Batch:
    """Upload *lines* and create a batch over them."""
    uploaded = await sim.openai.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return await sim.openai.batches.create(
        input_file_id=uploaded.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        **extra,
    )


async def download(sim: Sim, file_id: str | None) -> list[dict[str, Any]]:
    """The JSON lines of an output or error file."""
    assert file_id is not None
    content = await sim.openai.files.content(file_id)
    return [json.loads(line) for line in content.content.splitlines()]


async def at(sim: Sim, batch_id: str, seconds_after_start: float) -> Batch:
    """The batch as seen *seconds_after_start* seconds after ``START``."""
    sim.clock.advance(START + seconds_after_start - sim.clock.time())
    return await sim.openai.batches.retrieve(batch_id)


def ts(seconds_after_start: float) -> int:
    return int(START + seconds_after_start)


def rfc(seconds_after_start: float) -> datetime:
    return datetime.fromtimestamp(START + seconds_after_start, UTC)


def text_of_chat(line: dict[str, Any]) -> str:
    content: str = line["response"]["body"]["choices"][0]["message"]["content"]
    return content


# ----------------------------------------------------------------------------------------
# OpenAI: the lifecycle


@pytest.mark.parametrize(
    ("elapsed", "status", "counts"),
    [
        (0.0, "validating", (0, 0, 0)),
        (9.5, "validating", (0, 0, 0)),
        (10.0, "in_progress", (4, 0, 0)),
        (11.0, "in_progress", (4, 1, 0)),
        (13.5, "in_progress", (4, 3, 0)),
        (14.0, "finalizing", (4, 4, 0)),
        (18.9, "finalizing", (4, 4, 0)),
        (19.0, "completed", (4, 4, 0)),
        (100_000.0, "completed", (4, 4, 0)),
    ],
)
async def test_status_and_request_counts_follow_the_clock(
    sim: Sim, elapsed: float, status: str, counts: tuple[int, int, int]
) -> None:
    """Status and (total, completed, failed) at each moment of a 4-request batch."""
    batch = await submit(sim, chat_lines(4))
    seen = await at(sim, batch.id, elapsed)
    assert seen.request_counts is not None
    rc = seen.request_counts
    assert (status, counts) == (seen.status, (rc.total, rc.completed, rc.failed))


async def test_round_trip_sets_every_timestamp_and_delivers_shuffled_output(sim: Sim) -> None:
    """validating → in_progress → finalizing → completed; the output joins back on custom_id."""
    lines = chat_lines(12)
    batch = await submit(sim, lines, metadata={"run": "r1"})
    assert ("validating", None, None) == (batch.status, batch.output_file_id, batch.in_progress_at)
    assert (ts(0), ts(86_400), {"run": "r1"}) == (
        batch.created_at,
        batch.expires_at,
        batch.metadata,
    )
    statuses = [(await at(sim, batch.id, t)).status for t in (5, 10, 21, 22, 26, 27)]
    assert [
        "validating",
        "in_progress",
        "in_progress",
        "finalizing",
        "finalizing",
        "completed",
    ] == statuses

    done = await sim.openai.batches.retrieve(batch.id)
    expected_times = (ts(10), ts(22), ts(27), None, None, None, None)
    actual_times = (
        done.in_progress_at,
        done.finalizing_at,
        done.completed_at,
        done.failed_at,
        done.expired_at,
        done.cancelling_at,
        done.cancelled_at,
    )
    assert expected_times == actual_times
    assert (MODEL, "/v1/chat/completions", None, None) == (
        done.model,
        done.endpoint,
        done.error_file_id,
        done.errors,
    )

    output = await download(sim, done.output_file_id)
    texts = {line["custom_id"]: line["body"]["messages"][-1]["content"] for line in lines}
    assert sorted(texts) == sorted(line["custom_id"] for line in output)
    assert [line["custom_id"] for line in lines] != [line["custom_id"] for line in output]
    for line in output:
        assert (200, None) == (line["response"]["status_code"], line["error"])
        assert line["id"].startswith("batch_req_")
        assert line["response"]["request_id"].startswith("req_")
        assert text_of_chat(line).startswith(f"[{content_tag(texts[line['custom_id']])}]")

    usage = done.usage
    assert usage is not None
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in output)
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in output)
    assert (prompt, completion, prompt + completion) == (
        usage.input_tokens,
        usage.output_tokens,
        usage.total_tokens,
    )


async def test_output_file_object_and_input_file_are_retrievable(sim: Sim) -> None:
    """The uploaded file and the output file are File objects; content is byte-exact."""
    data = jsonl(chat_lines(2))
    uploaded = await sim.openai.files.create(file=("in.jsonl", data), purpose="batch")
    assert ("file", len(data), "in.jsonl", "batch", "processed", ts(0)) == (
        uploaded.object,
        uploaded.bytes,
        uploaded.filename,
        uploaded.purpose,
        uploaded.status,
        uploaded.created_at,
    )
    assert data == (await sim.openai.files.content(uploaded.id)).content
    batch = await sim.openai.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = await at(sim, batch.id, 17)
    assert done.output_file_id is not None
    output = await sim.openai.files.retrieve(done.output_file_id)
    content = (await sim.openai.files.content(done.output_file_id)).content
    assert ("batch_output", len(content), ts(17)) == (
        output.purpose,
        output.bytes,
        output.created_at,
    )


async def test_embeddings_batch_returns_embedding_lists(sim: Sim) -> None:
    """An embeddings batch answers each line with the simulator's embeddings body."""
    lines: list[dict[str, Any]] = [
        {
            "custom_id": f"e-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": [f"text {i}", "shared"]},
        }
        for i in range(3)
    ]
    batch = await submit(sim, lines, endpoint="/v1/embeddings")
    done = await at(sim, batch.id, 100)
    output = {
        line["custom_id"]: line["response"]["body"]
        for line in await download(sim, done.output_file_id)
    }
    assert {line["custom_id"]: embeddings_response(line["body"]) for line in lines} == output
    assert done.usage is not None
    assert (sum(estimate_tokens(line["body"]) for line in lines), 0) == (
        done.usage.input_tokens,
        done.usage.output_tokens,
    )


async def test_failed_items_go_to_the_error_file(make_sim: MakeSim) -> None:
    """Injected failures and invalid bodies fail their line only; the rest are delivered."""
    sim = await make_sim(fail_custom_ids={"r-1"}, failure_status_code=503)
    bad = {
        "custom_id": "no-messages",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL},
    }
    lines = [*chat_lines(3), bad]
    batch = await submit(sim, lines)
    done = await at(sim, batch.id, 100)
    assert done.request_counts is not None
    assert ("completed", 4, 2, 2) == (
        done.status,
        done.request_counts.total,
        done.request_counts.completed,
        done.request_counts.failed,
    )
    errors = {
        line["custom_id"]: line["response"] for line in await download(sim, done.error_file_id)
    }
    assert {"r-1": 503, "no-messages": 400} == {cid: r["status_code"] for cid, r in errors.items()}
    assert ("server_error", "missing_required_parameter") == (
        errors["r-1"]["body"]["error"]["type"],
        errors["no-messages"]["body"]["error"]["code"],
    )
    assert ["r-0", "r-2"] == sorted(
        line["custom_id"] for line in await download(sim, done.output_file_id)
    )


async def test_failure_rate_is_seeded_and_deterministic(make_sim: MakeSim) -> None:
    """The same seed fails the same share of requests; a failure rate of 1 fails them all."""
    fails = []
    for rate in (0.5, 0.5, 1.0):
        sim = await make_sim(failure_rate=rate, seed=7)
        done = await at(sim, (await submit(sim, chat_lines(40))).id, 1_000)
        assert done.request_counts is not None
        fails.append(done.request_counts.failed)
    assert fails[0] == fails[1]
    assert 5 < fails[0] < 35
    assert 40 == fails[2]


async def test_expiry_delivers_finished_items_and_reports_the_rest(make_sim: MakeSim) -> None:
    """The window closes after 3 of 5 items: expired, 3 outputs, 2 batch_expired lines."""
    sim = await make_sim(completion_window_seconds=13.0)
    batch = await submit(sim, chat_lines(5))
    assert ts(13) == batch.expires_at
    assert "in_progress" == (await at(sim, batch.id, 12.9)).status
    done = await at(sim, batch.id, 13.0)
    assert done.request_counts is not None
    assert ("expired", ts(13), None, (5, 3, 0)) == (
        done.status,
        done.expired_at,
        done.completed_at,
        (done.request_counts.total, done.request_counts.completed, done.request_counts.failed),
    )
    assert ["r-0", "r-1", "r-2"] == sorted(
        line["custom_id"] for line in await download(sim, done.output_file_id)
    )
    expired = sorted(await download(sim, done.error_file_id), key=lambda line: line["custom_id"])
    assert [
        (
            cid,
            None,
            {"code": "batch_expired", "message": EXPIRED},
        )
        for cid in ("r-3", "r-4")
    ] == [(line["custom_id"], line["response"], line["error"]) for line in expired]


async def test_cancel_delivers_what_ran_and_skips_the_rest(sim: Sim) -> None:
    """in_progress → cancelling → cancelled; the 2 finished items are in the output file."""
    batch = await submit(sim, chat_lines(5))
    await at(sim, batch.id, 12.5)
    cancelling = await sim.openai.batches.cancel(batch.id)
    assert ("cancelling", ts(12.5), None, None) == (
        cancelling.status,
        cancelling.cancelling_at,
        cancelling.cancelled_at,
        cancelling.output_file_id,
    )
    assert "cancelling" == (await sim.openai.batches.cancel(batch.id)).status
    assert "cancelling" == (await at(sim, batch.id, 15.4)).status
    done = await at(sim, batch.id, 15.5)
    assert done.request_counts is not None
    assert ("cancelled", ts(15.5), 2, None) == (
        done.status,
        done.cancelled_at,
        done.request_counts.completed,
        done.error_file_id,
    )
    assert ["r-0", "r-1"] == sorted(
        line["custom_id"] for line in await download(sim, done.output_file_id)
    )
    assert "cancelled" == (await at(sim, batch.id, 1_000)).status


async def test_cancel_during_validation_runs_nothing(sim: Sim) -> None:
    """A batch cancelled while validating never starts and has no files."""
    batch = await submit(sim, chat_lines(3))
    await sim.openai.batches.cancel(batch.id)
    done = await at(sim, batch.id, 100)
    assert ("cancelled", None, None, None) == (
        done.status,
        done.in_progress_at,
        done.output_file_id,
        done.error_file_id,
    )


async def test_cancel_of_an_ended_batch_is_a_conflict(sim: Sim) -> None:
    """Cancelling a completed batch answers 409 in OpenAI's error shape."""
    batch = await submit(sim, chat_lines(1))
    await at(sim, batch.id, 100)
    with pytest.raises(openai.ConflictError) as caught:
        await sim.openai.batches.cancel(batch.id)
    body = caught.value.body
    assert isinstance(body, dict)
    assert (409, "invalid_request_error", "Cannot cancel a batch with status 'completed'.") == (
        caught.value.status_code,
        body["type"],
        body["message"],
    )


# ----------------------------------------------------------------------------------------
# OpenAI: validation


@pytest.mark.parametrize(
    ("lines", "code", "line_number"),
    [
        pytest.param(
            [chat_line("a", "x"), chat_line("b", "y", model="gpt-4o")],
            "model_mismatch",
            2,
            id="mixed-models",
        ),
        pytest.param(
            [chat_line("a", "x"), chat_line("a", "y")],
            "duplicate_custom_id",
            2,
            id="duplicate-custom-id",
        ),
        pytest.param(
            [chat_line("a", "x"), '{"custom_id": "b", '],
            "invalid_json_line",
            2,
            id="malformed-line",
        ),
        pytest.param([chat_line("a", "x"), "[1, 2]"], "invalid_json_line", 2, id="not-an-object"),
        pytest.param(
            [{k: v for k, v in chat_line("a", "x").items() if k != "custom_id"}],
            "missing_required_parameter",
            1,
            id="missing-custom-id",
        ),
        pytest.param(
            [chat_line("a", "x") | {"url": "/v1/embeddings"}], "url_mismatch", 1, id="url-mismatch"
        ),
        pytest.param([chat_line("a", "x") | {"method": "GET"}], "invalid_method", 1, id="method"),
        pytest.param(
            [chat_line("a", "x") | {"body": "hi"}], "invalid_request", 1, id="body-not-object"
        ),
        pytest.param(chat_lines(4), "too_many_tasks", None, id="too-many-requests"),
        pytest.param([""], "empty_file", None, id="empty-file"),
    ],
)
async def test_invalid_input_files_fail_validation(
    make_sim: MakeSim, lines: list[dict[str, Any] | str], code: str, line_number: int | None
) -> None:
    """A bad input file: validating, then failed with the error in errors.data."""
    sim = await make_sim(max_requests_per_file=3)
    batch = await submit(sim, lines)
    assert (None, "validating") == (batch.errors, batch.status)
    assert "validating" == (await at(sim, batch.id, 9)).status
    failed = await at(sim, batch.id, 10)
    assert failed.errors is not None
    assert failed.errors.data is not None
    assert ("failed", ts(10), None, "list") == (
        failed.status,
        failed.failed_at,
        failed.in_progress_at,
        failed.errors.object,
    )
    assert [(code, line_number)] == [(e.code, e.line) for e in failed.errors.data]
    assert "failed" == (await at(sim, batch.id, 1_000)).status


async def test_mixed_models_message_names_the_rule(sim: Sim) -> None:
    """The model_mismatch error says that a file holds requests to a single model."""
    batch = await submit(sim, [chat_line("a", "x"), chat_line("b", "y", model="gpt-4o")])
    failed = await at(sim, batch.id, 10)
    assert failed.errors is not None
    assert failed.errors.data is not None
    message = failed.errors.data[0].message or ""
    assert "each input file can only include requests to a single model" in message


async def test_enqueued_token_limit_fails_a_batch_until_the_queue_drains(make_sim: MakeSim) -> None:
    """token_limit_exceeded while another batch is in progress; accepted once it completed."""
    lines = chat_lines(3)
    tokens = sum(estimate_tokens(line["body"]) for line in lines)
    sim = await make_sim(enqueued_token_limit=tokens + tokens // 2)
    first = await submit(sim, lines)
    assert "in_progress" == (await at(sim, first.id, 10)).status

    second = await submit(sim, lines)
    refused = await at(sim, second.id, 20)
    assert refused.errors is not None
    assert refused.errors.data is not None
    expected = (
        f"Enqueued token limit reached for {MODEL} in organization org-llmbatch-sim. "
        f"Limit: {tokens + tokens // 2:,} enqueued tokens. "
        "Please try again once some in_progress batches have been completed."
    )
    assert ("failed", "token_limit_exceeded", expected) == (
        refused.status,
        refused.errors.data[0].code,
        refused.errors.data[0].message,
    )

    assert "completed" == (await sim.openai.batches.retrieve(first.id)).status
    third = await submit(sim, lines)
    assert "in_progress" == (await at(sim, third.id, 30)).status
    assert 1 == sim.backend.stats()["batches_token_limited"]


async def test_token_limit_is_per_model(make_sim: MakeSim) -> None:
    """A batch for another model is not held back by the first model's queue."""
    lines = chat_lines(3)
    tokens = sum(estimate_tokens(line["body"]) for line in lines)
    sim = await make_sim(enqueued_token_limit=tokens)
    await submit(sim, lines)
    other = await submit(
        sim, [chat_line(f"o-{i}", f"question number {i}", model="gpt-4o") for i in range(3)]
    )
    assert "in_progress" == (await at(sim, other.id, 10)).status


@pytest.mark.parametrize(
    ("change", "param"),
    [
        pytest.param({"completion_window": "1h"}, "completion_window", id="window"),
        pytest.param({"endpoint": "/v1/nope"}, "endpoint", id="unknown-endpoint"),
        pytest.param({"endpoint": "/v1/images/edits"}, "endpoint", id="unsimulated-endpoint"),
        pytest.param(
            {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", id="17-metadata-pairs"
        ),
        pytest.param({"metadata": {"k" * 65: "v"}}, "metadata", id="long-metadata-key"),
        pytest.param({"metadata": {"k": "v" * 513}}, "metadata.k", id="long-metadata-value"),
        pytest.param({"input_file_id": "file-missing"}, "input_file_id", id="unknown-file"),
        pytest.param(
            {"output_expires_after": {"anchor": "created_at", "seconds": 60}},
            "output_expires_after",
            id="expires-after",
        ),
    ],
)
async def test_bad_batch_requests_are_refused_with_400(
    sim: Sim, change: dict[str, Any], param: str
) -> None:
    """Invalid create parameters get a 400 in OpenAI's error shape, and no batch."""
    uploaded = await sim.openai.files.create(
        file=("in.jsonl", jsonl(chat_lines(1))), purpose="batch"
    )
    params: dict[str, Any] = {
        "input_file_id": uploaded.id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    } | change
    with pytest.raises(openai.BadRequestError) as caught:
        await sim.openai.batches.create(**params)
    assert (400, "invalid_request_error", param) == (
        caught.value.status_code,
        caught.value.type,
        caught.value.param,
    )
    assert 0 == sim.backend.stats()["batches_created"]


async def test_metadata_at_the_limits_is_accepted(sim: Sim) -> None:
    """16 pairs, 64-character keys and 512-character values are allowed."""
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    batch = await submit(sim, chat_lines(1), metadata=metadata)
    assert metadata == batch.metadata


async def test_a_file_for_another_purpose_cannot_start_a_batch(sim: Sim) -> None:
    """Only purpose=batch files are batch input."""
    uploaded = await sim.openai.files.create(
        file=("in.jsonl", jsonl(chat_lines(1))), purpose="user_data"
    )
    with pytest.raises(openai.BadRequestError) as caught:
        await sim.openai.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert "input_file_id" == caught.value.param


@pytest.mark.parametrize(
    ("purpose", "size", "code"),
    [
        pytest.param("nonsense", 10, "invalid_value", id="bad-purpose"),
        pytest.param("batch", 101, "file_too_large", id="too-large"),
    ],
)
async def test_bad_uploads_are_refused_with_400(
    make_sim: MakeSim, purpose: str, size: int, code: str
) -> None:
    """Upload validation: known purpose and the size limit."""
    sim = await make_sim(max_file_bytes=100)
    with pytest.raises(openai.BadRequestError) as caught:
        await sim.openai.files.create(file=("in.jsonl", b"x" * size), purpose=purpose)  # type: ignore[arg-type]
    assert (400, code) == (caught.value.status_code, caught.value.code)
    assert 0 == sim.backend.stats()["files_uploaded"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "shape"),
    [
        pytest.param("POST", "/v1/batches", {"data": b"{not json"}, 400, "openai", id="bad-json"),
        pytest.param("POST", "/v1/batches", {"json": [1]}, 400, "openai", id="json-not-object"),
        pytest.param("POST", "/v1/files", {"json": {}}, 400, "openai", id="upload-not-multipart"),
        pytest.param(
            "POST", "/v1/files", {"data": {"file": b"x"}}, 400, "openai", id="upload-no-purpose"
        ),
        pytest.param(
            "POST", "/v1/files", {"data": {"purpose": "batch"}}, 400, "openai", id="upload-no-file"
        ),
        pytest.param("GET", "/v1/batches?limit=0", {}, 400, "openai", id="limit-0"),
        pytest.param("GET", "/v1/batches?after=batch_x", {}, 400, "openai", id="unknown-cursor"),
        pytest.param(
            "GET", "/v1/messages/batches?limit=1001", {}, 400, "anthropic", id="anthropic-limit"
        ),
        pytest.param(
            "GET",
            "/v1/messages/batches?after_id=a&before_id=b",
            {},
            400,
            "anthropic",
            id="both-cursors",
        ),
        pytest.param(
            "POST", "/v1/messages/batches", {"json": {}}, 400, "anthropic", id="no-requests"
        ),
        pytest.param(
            "POST", "/v1/messages/batches/msgbatch_x/cancel", {}, 404, "anthropic", id="cancel-404"
        ),
    ],
)
async def test_malformed_http_requests_get_provider_shaped_errors(
    sim: Sim, method: str, path: str, kwargs: dict[str, Any], status: int, shape: str
) -> None:
    """Raw requests the SDKs would never send still get the provider's error shape."""
    if "data" in kwargs and isinstance(kwargs["data"], dict):
        form = aiohttp.FormData()
        for name, value in kwargs["data"].items():
            form.add_field(name, value, filename="in.jsonl" if name == "file" else None)
        kwargs = {"data": form}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"{sim.root}{path}", **kwargs) as response,
    ):
        body = await response.json()
    if shape == "openai":
        assert (status, {"message", "type", "param", "code"}) == (
            response.status,
            set(body["error"]),
        )
    else:
        assert (status, "error", {"type", "message"}) == (
            response.status,
            body["type"],
            set(body["error"]),
        )
    assert 1 == sim.backend.stats()["batch_api_errors"]


async def test_unknown_ids_are_404(sim: Sim) -> None:
    """Unknown batch and file ids answer 404."""
    with pytest.raises(openai.NotFoundError):
        await sim.openai.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        await sim.openai.files.content("file-nope")
    with pytest.raises(anthropic.NotFoundError):
        await sim.anthropic.messages.batches.retrieve("msgbatch_nope")


async def test_file_delete(sim: Sim) -> None:
    """A deleted file is gone."""
    uploaded = await sim.openai.files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
    deleted = await sim.openai.files.delete(uploaded.id)
    assert (uploaded.id, True) == (deleted.id, deleted.deleted)
    with pytest.raises(openai.NotFoundError):
        await sim.openai.files.retrieve(uploaded.id)


async def test_file_list_filters_by_purpose_and_orders(sim: Sim) -> None:
    """GET /v1/files lists uploads newest first (or oldest first) and filters by purpose."""
    purposes: tuple[FilePurpose, ...] = ("batch", "user_data", "batch")
    ids = [
        (await sim.openai.files.create(file=(f"{i}.jsonl", b"{}\n"), purpose=purpose)).id
        for i, purpose in enumerate(purposes)
    ]
    newest = await sim.openai.files.list(purpose="batch")
    oldest = await sim.openai.files.list(order="asc")
    assert ([ids[2], ids[0]], ids) == ([f.id for f in newest.data], [f.id for f in oldest.data])


async def test_batch_list_pages_newest_first(sim: Sim) -> None:
    """GET /v1/batches pages with after/limit; auto-pagination sees every batch once."""
    ids = [(await submit(sim, chat_lines(1))).id for _ in range(5)]
    newest_first = ids[::-1]
    first = await sim.openai.batches.list(limit=2)
    assert (newest_first[:2], True) == ([b.id for b in first.data], first.has_more)
    last = await sim.openai.batches.list(limit=2, after=newest_first[3])
    assert (newest_first[4:], False) == ([b.id for b in last.data], last.has_more)
    assert newest_first == [b.id async for b in await sim.openai.batches.list(limit=2)]


# ----------------------------------------------------------------------------------------
# Anthropic message batches


def claude_request(custom_id: str, text: str, **params: Any) -> dict[str, Any]:
    """One Message Batches request."""
    return {
        "custom_id": custom_id,
        "params": {
            "model": CLAUDE,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": text}],
        }
        | params,
    }


def claude_requests(n: int) -> list[dict[str, Any]]:
    return [claude_request(f"doc-{i}", f"document number {i}") for i in range(n)]


async def create_message_batch(sim: Sim, requests: Sequence[dict[str, Any]]) -> MessageBatch:
    """POST /v1/messages/batches with plain dict requests."""
    return await sim.anthropic.messages.batches.create(requests=cast(Any, requests))


async def results(sim: Sim, batch_id: str) -> list[dict[str, Any]]:
    """The results of an ended batch, as plain dicts in delivery order."""
    decoder = await sim.anthropic.messages.batches.results(batch_id)
    return [line.model_dump(mode="json", exclude_none=True) async for line in decoder]


async def claude_at(sim: Sim, batch_id: str, seconds_after_start: float) -> MessageBatch:
    sim.clock.advance(START + seconds_after_start - sim.clock.time())
    return await sim.anthropic.messages.batches.retrieve(batch_id)


def counts_of(batch: MessageBatch) -> tuple[int, int, int, int, int]:
    c = batch.request_counts
    return c.processing, c.succeeded, c.errored, c.canceled, c.expired


async def test_message_batch_round_trip(sim: Sim) -> None:
    """in_progress (everything processing) → ended; results join back on custom_id."""
    requests = claude_requests(8)
    batch = await create_message_batch(sim, requests)
    assert batch.id.startswith("msgbatch_")
    assert ("message_batch", "in_progress", None, None) == (
        batch.type,
        batch.processing_status,
        batch.results_url,
        batch.ended_at,
    )
    assert (rfc(0), rfc(86_400), None, None) == (
        batch.created_at,
        batch.expires_at,
        batch.cancel_initiated_at,
        batch.archived_at,
    )
    midway = await claude_at(sim, batch.id, 5)
    assert ("in_progress", (8, 0, 0, 0, 0)) == (midway.processing_status, counts_of(midway))
    assert "in_progress" == (await claude_at(sim, batch.id, 12.9)).processing_status
    ended = await claude_at(sim, batch.id, 13)
    assert ("ended", rfc(13), (0, 8, 0, 0, 0)) == (
        ended.processing_status,
        ended.ended_at,
        counts_of(ended),
    )
    assert f"{sim.root}/v1/messages/batches/{batch.id}/results" == ended.results_url

    lines = await results(sim, batch.id)
    texts = {r["custom_id"]: r["params"]["messages"][-1]["content"] for r in requests}
    assert [r["custom_id"] for r in requests] != [line["custom_id"] for line in lines]
    assert sorted(texts) == sorted(line["custom_id"] for line in lines)
    for line in lines:
        message = line["result"]["message"]
        assert ("succeeded", "message", CLAUDE) == (
            line["result"]["type"],
            message["type"],
            message["model"],
        )
        assert message["content"][0]["text"].startswith(
            f"[{content_tag(texts[line['custom_id']])}]"
        )


async def test_message_batch_errored_results(make_sim: MakeSim) -> None:
    """Invalid params and injected failures come back as errored results with the nested error."""
    sim = await make_sim(fail_custom_ids={"doc-0"})
    requests = [*claude_requests(2), claude_request("zero", "x", max_tokens=0)]
    batch = await create_message_batch(sim, requests)
    ended = await claude_at(sim, batch.id, 100)
    assert (0, 1, 2, 0, 0) == counts_of(ended)
    by_id = {line["custom_id"]: line["result"] for line in await results(sim, batch.id)}
    assert ("succeeded", "errored", "errored") == tuple(
        by_id[c]["type"] for c in ("doc-1", "doc-0", "zero")
    )
    assert ("error", "api_error") == (
        by_id["doc-0"]["error"]["type"],
        by_id["doc-0"]["error"]["error"]["type"],
    )
    invalid = by_id["zero"]["error"]
    assert ("invalid_request_error", "max_tokens: Input should be greater than or equal to 1") == (
        invalid["error"]["type"],
        invalid["error"]["message"],
    )
    assert invalid["request_id"].startswith("req_")


async def test_message_batch_expiry(make_sim: MakeSim) -> None:
    """The window closes after 2 of 5 requests: 2 succeeded, 3 expired."""
    sim = await make_sim(completion_window_seconds=2.5)
    batch = await create_message_batch(sim, claude_requests(5))
    assert rfc(2.5) == batch.expires_at
    ended = await claude_at(sim, batch.id, 2.5)
    assert ("ended", rfc(2.5), (0, 2, 0, 0, 3)) == (
        ended.processing_status,
        ended.ended_at,
        counts_of(ended),
    )
    kinds = sorted(
        (line["custom_id"], line["result"]["type"]) for line in await results(sim, batch.id)
    )
    expected = [("doc-0", "succeeded"), ("doc-1", "succeeded")] + [
        (f"doc-{i}", "expired") for i in (2, 3, 4)
    ]
    assert expected == kinds


async def test_message_batch_cancel(sim: Sim) -> None:
    """in_progress → canceling → ended; finished requests succeed, the rest are canceled."""
    batch = await create_message_batch(sim, claude_requests(5))
    sim.clock.advance(1.5)
    canceling = await sim.anthropic.messages.batches.cancel(batch.id)
    assert ("canceling", rfc(1.5), (5, 0, 0, 0, 0)) == (
        canceling.processing_status,
        canceling.cancel_initiated_at,
        counts_of(canceling),
    )
    ended = await claude_at(sim, batch.id, 4.5)
    assert ("ended", rfc(4.5), (0, 1, 0, 4, 0)) == (
        ended.processing_status,
        ended.ended_at,
        counts_of(ended),
    )
    kinds = sorted(
        (line["custom_id"], line["result"]["type"]) for line in await results(sim, batch.id)
    )
    assert [("doc-0", "succeeded")] + [(f"doc-{i}", "canceled") for i in range(1, 5)] == kinds
    with pytest.raises(anthropic.BadRequestError):
        await sim.anthropic.messages.batches.cancel(batch.id)


@pytest.mark.parametrize(
    "requests",
    [
        pytest.param([claude_request("", "x")], id="empty"),
        pytest.param([claude_request("a" * 65, "x")], id="65-chars"),
        pytest.param([claude_request("has space", "x")], id="space"),
        pytest.param([claude_request("dot.ted", "x")], id="dot"),
        pytest.param([claude_request("same", "x"), claude_request("same", "y")], id="duplicate"),
        pytest.param([{"custom_id": "no-params"}], id="no-params"),
        pytest.param([], id="no-requests"),
        pytest.param(claude_requests(4), id="too-many"),
    ],
)
async def test_message_batch_create_validation(
    make_sim: MakeSim, requests: list[dict[str, Any]]
) -> None:
    """Bad custom_ids, duplicates, missing params, too many requests: 400 invalid_request_error."""
    sim = await make_sim(anthropic_max_requests=3)
    with pytest.raises(anthropic.BadRequestError) as caught:
        await create_message_batch(sim, requests)
    body = caught.value.body
    assert isinstance(body, dict)
    assert ("error", "invalid_request_error", True) == (
        body["type"],
        body["error"]["type"],
        body["request_id"].startswith("req_"),
    )
    assert caught.value.request_id == body["request_id"]


async def test_message_batch_custom_id_at_the_limits_is_accepted(sim: Sim) -> None:
    """64 characters of [A-Za-z0-9_-] is a valid custom_id."""
    custom_id = ("Az09_-" * 11)[:64]
    batch = await create_message_batch(sim, [claude_request(custom_id, "x")])
    await claude_at(sim, batch.id, 100)
    assert [custom_id] == [line["custom_id"] for line in await results(sim, batch.id)]


async def test_message_batch_body_size_limit(make_sim: MakeSim) -> None:
    """A body over anthropic_max_bytes is refused with 413 request_too_large."""
    sim = await make_sim(anthropic_max_bytes=2_000)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await create_message_batch(sim, [claude_request("big", "x" * 5_000)])
    body = caught.value.body
    assert isinstance(body, dict)
    assert (413, "request_too_large") == (caught.value.status_code, body["error"]["type"])


async def test_message_batch_delete_only_when_ended(sim: Sim) -> None:
    """DELETE is refused while processing and removes the batch once it has ended."""
    batch = await create_message_batch(sim, claude_requests(2))
    with pytest.raises(anthropic.BadRequestError):
        await sim.anthropic.messages.batches.delete(batch.id)
    await claude_at(sim, batch.id, 100)
    deleted = await sim.anthropic.messages.batches.delete(batch.id)
    assert (batch.id, "message_batch_deleted") == (deleted.id, deleted.type)
    with pytest.raises(anthropic.NotFoundError):
        await sim.anthropic.messages.batches.retrieve(batch.id)


async def test_message_batch_results_before_end_are_refused(sim: Sim) -> None:
    """The SDK refuses results without a results_url; the endpoint itself answers 400."""
    batch = await create_message_batch(sim, claude_requests(2))
    with pytest.raises(anthropic.AnthropicError):
        await sim.anthropic.messages.batches.results(batch.id)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{sim.root}/v1/messages/batches/{batch.id}/results") as response,
    ):
        body = await response.json()
    assert (400, "error", "invalid_request_error") == (
        response.status,
        body["type"],
        body["error"]["type"],
    )


async def test_message_batch_list_pagination(sim: Sim) -> None:
    """after_id pages to older batches, before_id to newer; first_id/last_id frame a page."""
    ids = [(await create_message_batch(sim, claude_requests(1))).id for _ in range(5)]
    newest_first = ids[::-1]
    page = await sim.anthropic.messages.batches.list(limit=2)
    assert (newest_first[:2], True, newest_first[0], newest_first[1]) == (
        [b.id for b in page.data],
        page.has_more,
        page.first_id,
        page.last_id,
    )
    older = await sim.anthropic.messages.batches.list(limit=2, after_id=newest_first[1])
    assert (newest_first[2:4], True) == ([b.id for b in older.data], older.has_more)
    newer = await sim.anthropic.messages.batches.list(limit=2, before_id=newest_first[4])
    assert (newest_first[2:4], True) == ([b.id for b in newer.data], newer.has_more)
    assert newest_first == [b.id async for b in await sim.anthropic.messages.batches.list(limit=2)]


# ----------------------------------------------------------------------------------------
# stats, scale and configuration


async def test_large_batches_are_built_in_a_worker_thread(
    make_sim: MakeSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the offload thresholds the same files are built off the event loop."""
    offloaded: list[str] = []
    to_thread = asyncio.to_thread

    async def spy(work: Callable[[], Any]) -> Any:
        if getattr(work, "__module__", None) == _batchsim.__name__:  # the SDKs use threads too
            offloaded.append(work.__qualname__)
        return await to_thread(work)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    delivered = []
    for threshold in (10**9, 1):
        monkeypatch.setattr(_batchsim, "_OFFLOAD_ITEMS", threshold)
        monkeypatch.setattr(_batchsim, "_OFFLOAD_BYTES", threshold)
        sim = await make_sim()
        batch = await submit(sim, chat_lines(3))
        done = await at(sim, batch.id, 100)
        message_batch = await create_message_batch(sim, claude_requests(3))
        await claude_at(sim, message_batch.id, 200)
        output = await download(sim, done.output_file_id)
        delivered.append((output, await results(sim, message_batch.id)))
    assert delivered[0] == delivered[1]
    # the second round: batch JSON body, input file, result files, Anthropic body, items, results
    assert 6 == len(offloaded)


async def test_stats_count_uploads_batches_and_request_fates(make_sim: MakeSim) -> None:
    """stats() counts what was created and, for ended batches, how each request ended."""
    sim = await make_sim(fail_custom_ids={"r-0", "doc-0"}, completion_window_seconds=12.0)
    completed = await submit(sim, chat_lines(1))
    expiring = await submit(sim, chat_lines(4))  # 2 run before the 12 s window closes
    claude = await create_message_batch(sim, claude_requests(3))
    sim.clock.advance(1.5)
    await sim.anthropic.messages.batches.cancel(claude.id)
    assert 0 == sim.backend.stats()["batch_requests_completed"]
    sim.clock.advance(1_000)
    stats = sim.backend.stats()
    expected = {
        "files_uploaded": 2,
        "openai_batches_created": 2,
        "anthropic_batches_created": 1,
        "batches_created": 3,
        "batches_ended": 3,
        "batches_failed": 0,
        "batches_cancel_requested": 1,
        "batch_requests_completed": 1,  # r-1 of the expiring batch
        "batch_requests_failed": 3,  # r-0 in both OpenAI batches, doc-0 before the cancel
        "batch_requests_expired": 2,
        "batch_requests_canceled": 2,
    }
    assert expected == {key: stats[key] for key in expected}
    statuses = [(await sim.openai.batches.retrieve(b.id)).status for b in (completed, expiring)]
    assert ["completed", "expired"] == statuses


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_rate": 1.5},
        {"seconds_per_request": -1.0},
        {"failure_status_code": 200},
        {"max_requests_per_file": 0},
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    """Impossible configurations fail at construction."""
    with pytest.raises(ValueError):
        BatchSimConfig(**kwargs)


def test_config_is_a_readable_value() -> None:
    """The config is frozen, compares by value and shows its fields."""
    config = BatchSimConfig(seconds_per_request=0.5, fail_custom_ids={"a"})  # type: ignore[arg-type]
    assert BatchSimConfig(seconds_per_request=0.5, fail_custom_ids=frozenset({"a"})) == config
    assert "seconds_per_request=0.5" in repr(config)
    assert "BatchBackend" in repr(BatchBackend(config))
