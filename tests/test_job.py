"""llmbatch.job in-process: specs, prepared requests, progress arithmetic, and the
output writer (the end-to-end runs are in tests/test_cli.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from llmbatch.batchapi import cancel_batches
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


def batch_spec(tmp_path: Path, records: int) -> JobSpec:
    """A batch-mode job over *records* records ``doc-0``, ``doc-1``... keyed by id."""
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"doc-{i}", "text": f"doc {i}"}) + "\n" for i in range(records))
    )
    return JobSpec(
        input=source,
        output=tmp_path / "out.jsonl",
        template="Summarize: {text}",
        model="gpt-4o-mini",
        id_field="id",
        mode="batch",
        poll_interval=60.0,
    )


async def test_retry_failed_in_batch_mode_submits_the_failed_item_again(tmp_path: Path) -> None:
    """A record whose batch answered it with an error (after its resubmits) stays
    failed on a plain rerun; with ``retry_failed`` it goes into new batches, with a
    whole resubmit budget, instead of getting its old error back from the journal."""
    spec = batch_spec(tmp_path, 3)
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


class SignallingStore(Store):
    """A store that sets ``batch_saved`` once a batch is journaled."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batch_saved = asyncio.Event()

    def save_batch(self, batch_id: str, **details: Any) -> None:
        super().save_batch(batch_id, **details)
        self.batch_saved.set()


def output_lines(spec: JobSpec) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(spec.output).read_text().splitlines()]


async def test_a_rerun_after_a_batch_cancel_stores_what_it_ran_once_and_sends_only_the_rest(
    tmp_path: Path,
) -> None:
    """Run 1 (batch mode) is interrupted after submitting its batch of 10; the batch
    is cancelled once 3 had run (doc-1 of them failing with a 400). Run 2, even in
    online mode, collects the cancelled batch: its 2 answers and doc-1's error are
    stored once, nothing goes online, and only the 7 never run are sent again (in a
    batch). Run 3 finds everything in the store and sends nothing."""
    spec = batch_spec(tmp_path, 10)
    clock = FakeClock(start=10.0)  # small: the loop's timers compare times to 1 ns
    batches = BatchSimConfig(
        validating_seconds=1.0,
        seconds_per_request=1.0,
        finalizing_seconds=1.0,
        fail_custom_ids=frozenset({"doc-1"}),
        failure_status_code=400,
    )
    with clock.patch_loop():
        async with (
            Simulator(batch=batches, batch_clock=clock.time) as sim,
            OpenAIProvider(base_url=sim.base_url, api_key="sk-test") as provider,
        ):
            client = LLMClient(provider, model=spec.model, limits=LIMITS)
            with SignallingStore(spec.store_path) as journal:
                first = asyncio.ensure_future(run_job(spec, client, store=journal))
                await journal.batch_saved.wait()  # virtual time has stood still
                first.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await first
                clock.advance(1.0 + 3.5)  # doc-0, doc-1, doc-2 have run
                assert 1 == len(await cancel_batches(provider.batch(), journal))
            online = replace(spec, mode="online")
            reports = [await run_job(online, client), await run_job(online, client)]
            stats = sim.stats()
    assert [(9, 1, 0, 0), (0, 0, 9, 1)] == [
        (r.progress.done, r.progress.failed, r.progress.reused, r.progress.failed_earlier)
        for r in reports
    ]
    assert (0, 2, 9, 1, 7) == (
        stats.ok,
        stats.batch["openai_batches_created"],
        stats.batch["batch_requests_completed"],
        stats.batch["batch_requests_failed"],
        stats.batch["batch_requests_canceled"],
    )
    with Store(spec.store_path) as store:
        items = {item.key: item.status for item in store.items()}
        journaled = [(b.status, sorted(b.items.values())) for b in store.batches()]
    assert {f"doc-{i}": "failed" if i == 1 else "done" for i in range(10)} == items
    never_ran = sorted(f"doc-{i}" for i in range(3, 10))
    assert [("collected", sorted(items)), ("collected", never_ran)] == journaled
    counts = write_output(spec)
    assert (9, 1, 0) == (counts.ok, counts.failed, counts.pending)
    lines = output_lines(spec)
    assert [f"doc-{i}" for i in range(10)] == [line["key"] for line in lines]
    answers = {line["key"]: line["answer"][:10] for line in lines if line["status"] == "ok"}
    expected = {f"doc-{i}": f"[{content_tag(f'Summarize: doc {i}')}]" for i in range(10) if i != 1}
    assert expected == answers


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"output": "in.jsonl"}, "is the input file"),
        ({"errors": "in.jsonl"}, "is the input file"),
        ({"store": "in.jsonl"}, "is the input file"),
        ({"input": "out.jsonl.partial"}, "temporary file"),
        ({"errors": "out.jsonl"}, "same file"),
        ({"store": "out.jsonl"}, "same file"),
    ],
)
def test_check_paths_refuses_to_write_over_the_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: dict[str, str], message: str
) -> None:
    """Nothing a job writes may be its input, nor two of its files the same one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "out.jsonl.partial").write_text('{"text": "a"}\n')
    options: dict[str, Any] = {"input": "in.jsonl", "output": "out.jsonl", "model": "m"}
    spec = JobSpec(**{**options, **changes})
    with pytest.raises(ValueError, match=message):
        spec.check_paths()
    JobSpec(**options).check_paths()  # the plain paths are fine
