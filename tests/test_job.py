"""llmbatch.job in-process: specs, prepared requests, progress arithmetic, and the
output writer (the end-to-end runs are in tests/test_cli.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from llmbatch.client import LLMClient
from llmbatch.errors import AuthenticationFailed
from llmbatch.failure import OnError
from llmbatch.io import Record
from llmbatch.job import JobProgress, JobSpec, prepare, run_job, write_output
from llmbatch.limits import Limits
from llmbatch.models import Request
from llmbatch.providers.fake import FakeProvider
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.store import Store
from llmbatch.testing import FakeClock, Simulator
from llmbatch.testing._content import content_tag
from llmbatch.testing.simulator import BatchSimConfig

LIMITS = Limits(rpm=100_000, tpm=100_000_000)


def spec_for(tmp_path: Path, n: int = 4, **changes: Any) -> JobSpec:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(n)))
    return JobSpec(
        input=source,
        output=tmp_path / "out.jsonl",
        template="Summarize: {text}",
        model="gpt-4o-mini",
        **changes,
    )


def test_store_path_and_on_error_normalisation(tmp_path: Path) -> None:
    """The checkpoint sits next to the output unless given; "fail-fast" is understood."""
    spec = spec_for(tmp_path, on_error="fail-fast")
    assert tmp_path / "out.jsonl.llmbatch.sqlite" == spec.store_path
    assert OnError.FAIL_FAST == spec.on_error
    assert Path("elsewhere.db") == replace(spec, store="elsewhere.db").store_path


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({"template": "Other: {text}"}, False),
        ({"model": "gpt-4o"}, False),
        ({"system": "Be brief."}, False),
        ({"max_tokens": 10}, False),
        ({"temperature": 0.5}, False),
        ({"json_mode": True}, False),
        ({"provider": "anthropic"}, False),
        ({"limit": 2}, True),
        ({"id_field": "id"}, True),
        ({"max_concurrency": 3}, True),
        ({"mode": "batch"}, True),
        ({"input": "moved.jsonl"}, True),
    ],
)
def test_fingerprint_covers_what_makes_the_answers(
    tmp_path: Path, change: dict[str, Any], same: bool
) -> None:
    """What changes the requests changes the job; where and how fast it runs does not."""
    spec = spec_for(tmp_path)
    assert same == (spec.fingerprint() == replace(spec, **change).fingerprint())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def record(fields: dict[str, Any], error: str | None = None) -> Record:
    return Record(index=0, source="in.jsonl:1", key="k", fields=fields, error=error)


def test_prepare_builds_the_request_or_says_why_not(tmp_path: Path) -> None:
    """A good record becomes a keyed request; a missing field, an empty text and an
    unreadable record become errors naming the record's place."""
    spec = spec_for(tmp_path, system="Be brief.", max_tokens=7, json_mode=True)
    ready = prepare(spec, record({"text": "tides"}))
    assert ready.request is not None
    assert ("k", "gpt-4o-mini", 7) == (
        ready.request.key,
        ready.request.model,
        ready.request.max_tokens,
    )
    assert {"type": "json_object"} == ready.request.response_format
    assert "system" == ready.request.messages[0]["role"]
    missing = prepare(spec, record({"body": "x"}))
    assert missing.error is not None
    assert "in.jsonl:1" in missing.error
    assert "'text'" in missing.error
    assert "body" in missing.error
    empty = prepare(spec, record({"text": " "}))
    assert empty.error is not None
    assert "empty" in empty.error
    assert "bad line" == prepare(spec, record({}, error="bad line")).error
    assert ready.fingerprint == prepare(spec, record({"text": "tides"})).fingerprint
    assert ready.fingerprint != prepare(spec, record({"text": "waves"})).fingerprint


def test_progress_rates_and_eta_with_injected_time() -> None:
    """Rates are over the last minute (or since the start); ETA follows them."""
    progress = JobProgress(total=100, started=0.0)
    assert progress.eta(now=1.0) is None  # no rate yet
    for second in range(10):
        progress.done += 1
        progress.completed(50, now=float(second))
    assert (60.0, 3000.0) == progress.rates(now=10.0)
    assert 90 * 60.0 / 60.0 == progress.eta(now=10.0)
    assert (1.0, 50.0) == progress.rates(now=69.0)  # only the last minute counts
    progress.sent = 12
    assert 2 == progress.in_flight
    assert JobProgress(total=None).eta() is None
    finished = JobProgress(total=1, reused=1)
    assert 0.0 == finished.eta()


async def test_run_then_rerun_in_process(simulator: Simulator, tmp_path: Path) -> None:
    """run_job answers every record once; a second run reuses them all; write_output
    puts them in order with their own answers."""
    spec = spec_for(tmp_path, n=6)
    async with OpenAIProvider(base_url=simulator.base_url, api_key="sk-test") as provider:
        client = LLMClient(provider, model=spec.model, limits=LIMITS)
        first = await run_job(spec, client)
        second = await run_job(spec, client)
    assert (6, 0) == (first.progress.done, first.progress.reused)
    assert (0, 6) == (second.progress.done, second.progress.reused)
    assert 6 == simulator.stats().ok
    counts = write_output(spec)
    assert 6 == counts.ok
    lines = read_jsonl(Path(spec.output))
    for i, line in enumerate(lines):
        assert line["answer"].startswith(f"[{content_tag(f'Summarize: doc {i}')}]")
        assert "request_id" not in line
        assert "latency" not in line


async def test_a_fatal_error_aborts_and_leaves_items_pending(tmp_path: Path) -> None:
    """A refused key aborts the job; its items are not stored as failed, so the output
    shows them pending and a rerun with a good key sends them."""

    def refuse(request: Request) -> str:
        raise AuthenticationFailed("bad key")

    spec = spec_for(tmp_path, n=3)
    report = await run_job(spec, LLMClient(FakeProvider(refuse), model=spec.model))
    assert report.aborted is not None
    assert "AuthenticationFailed" in report.aborted
    with Store(spec.store_path) as store:
        assert 0 == store.summary().failed
    assert 3 == write_output(spec).pending


def test_a_failed_write_leaves_the_old_output(tmp_path: Path) -> None:
    """If writing breaks midway, the previous output stays whole and no .partial stays."""
    spec = spec_for(tmp_path, n=5)
    Path(spec.output).write_text("previous\n")

    def broken() -> Iterator[Record]:
        yield from list(spec.records())[:3]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        write_output(spec, records=broken())
    assert "previous\n" == Path(spec.output).read_text()
    assert not Path(f"{spec.output}.partial").exists()
    assert 5 == write_output(spec).pending


async def test_retry_failed_in_batch_mode_submits_the_failed_item_again(tmp_path: Path) -> None:
    """A record whose batch answered it with an error (after its resubmits) stays
    failed on a plain rerun; with ``retry_failed`` it goes into new batches, with a
    whole resubmit budget, instead of getting its old error back from the journal."""
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"doc-{i}", "text": f"doc {i}"}) + "\n" for i in range(3))
    )
    spec = JobSpec(
        input=source,
        output=tmp_path / "out.jsonl",
        template="Summarize: {text}",
        model="gpt-4o-mini",
        id_field="id",
        mode="batch",
        poll_interval=60.0,
    )
    clock = FakeClock(start=10.0)  # small: the loop's timers compare times to 1 ns
    batches = BatchSimConfig(fail_custom_ids=frozenset({"doc-1"}))
    created: list[int] = []
    with clock.patch_loop():
        async with (
            Simulator(batch=batches, batch_clock=clock.time) as sim,
            OpenAIProvider(base_url=sim.base_url, api_key="sk-test") as provider,
        ):
            client = LLMClient(provider, model=spec.model, limits=LIMITS)
            reports = []
            for retry_failed in (False, False, True):
                reports.append(await run_job(replace(spec, retry_failed=retry_failed), client))
                created.append(sim.stats().batch["openai_batches_created"])
    assert [(2, 1), (0, 0), (0, 1)] == [(r.progress.done, r.progress.failed) for r in reports]
    # 1 batch + 2 resubmissions of doc-1; nothing; doc-1 alone, 1 + 2 times again
    assert [3, 3, 6] == created
    with Store(spec.store_path) as store:
        assert ["done", "failed", "done"] == [item.status for item in store.items()]
