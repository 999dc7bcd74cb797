"""Tests for llmbatch.store: the SQLite checkpoint of a job's finished items."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import llmbatch
from llmbatch.errors import ConfigurationError
from llmbatch.failure import ItemError
from llmbatch.models import Response, Usage
from llmbatch.store import (
    SCHEMA_VERSION,
    JobMismatch,
    Store,
    StoredItem,
    StoreSummary,
    error_record,
    response_record,
)
from llmbatch.structured import InvalidOutput

DESCRIPTION: dict[str, Any] = {
    "provider": "openai",
    "model": "gpt-4o-mini",
    "template": "Summarize: {text}",
    "system": None,
    "max_tokens": 256,
    "temperature": 0.0,
    "json": False,
}

# 40 characters after the prefix: the shape of a real project key, and unique on disk
CANARY_BODY = "Zq7Vw2Lm9Xc4Rt8Yp1Ks6Hd3Jf5Gb0Nn7Ee2Aa9T"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where the test's store lives (a real SQLite file)."""
    return tmp_path / "job.llmbatch.sqlite"


@pytest.fixture
def store(path: Path) -> Iterator[Store]:
    """An open store at *path*, closed after the test."""
    with Store(path) as opened:
        yield opened


def _response(
    text: str = "an answer",
    *,
    input_tokens: int = 10,
    output_tokens: int = 5,
    cost: float | None = None,
    **kwargs: Any,
) -> Response:
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return Response(text=text, usage=usage, cost=cost, **kwargs)


def _done(store: Store, key: str, index: int, **kwargs: Any) -> None:
    store.save_response(
        key,
        index=index,
        source=f"docs.jsonl:{index + 1}",
        fingerprint="fp",
        response=_response(**kwargs),
    )


def _failed(store: Store, key: str, index: int, *, invalid: bool = False) -> None:
    error: ItemError | str = ItemError(index=index, error_type="Timeout", message="slow")
    if invalid:
        error = "bad input"
    store.save_error(
        key,
        index=index,
        source=f"docs.jsonl:{index + 1}",
        fingerprint=None if invalid else "fp",
        error=error,
        invalid=invalid,
    )


def _file_bytes(path: Path) -> bytes:
    """The database file and its WAL / shared-memory companions, as they are on disk."""
    companions = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
    return b"".join(p.read_bytes() for p in companions if p.exists())


# -- the file --------------------------------------------------------------------------


def test_new_store_is_empty(store: Store, path: Path) -> None:
    """A new store is created on disk and holds no job and no items."""
    assert path.is_file()
    assert store.job() is None
    assert store.fingerprint() is None
    assert store.get("anything") is None
    assert [] == list(store.items())
    assert StoreSummary(0, 0, 0, 0, 0, None) == store.summary()
    assert 0 == store.summary().total


def test_store_creates_missing_parent_folders(tmp_path: Path) -> None:
    """The store's folder is created if it does not exist."""
    path = tmp_path / "a" / "b" / "job.sqlite"
    with Store(path) as store:
        assert path == store.path
    assert path.is_file()


def test_repr_names_the_file(store: Store, path: Path) -> None:
    """The repr shows the store's path."""
    assert f"<Store {str(path)!r}>" == repr(store)


def test_journal_mode_is_wal(store: Store, path: Path) -> None:
    """The file is in write-ahead-log mode (a persistent property of the database)."""
    _done(store, "a", 0)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert "wal" == db.execute("PRAGMA journal_mode").fetchone()[0]
        assert [(SCHEMA_VERSION,)] == db.execute(
            "SELECT value FROM meta WHERE name = 'schema'"
        ).fetchall()


def test_reopening_finds_everything_saved(path: Path) -> None:
    """A second Store on the same file sees the job and every item, unchanged."""
    with Store(path) as first:
        first.begin("fp-1", DESCRIPTION)
        _done(first, "a", 0, cost=0.25)
        _failed(first, "b", 1)
        _failed(first, "c", 2, invalid=True)
        saved = list(first.items())
    with Store(path) as second:
        assert "fp-1" == second.fingerprint()
        assert DESCRIPTION == second.job()
        assert saved == list(second.items())
        assert ["a", "b", "c"] == [item.key for item in saved]
        assert StoreSummary(1, 1, 1, 10, 5, 0.25) == second.summary()


def test_a_reader_sees_each_save_while_the_writer_is_open(path: Path) -> None:
    """Every save is committed when it returns: another connection reads it at once."""
    with Store(path) as writer, Store(path) as reader:
        assert reader.get("a") is None
        _done(writer, "a", 0)
        item = reader.get("a")
        assert item is not None
        assert "done" == item.status


def test_closed_store_refuses_work(path: Path) -> None:
    """Leaving the ``with`` block closes the database."""
    with Store(path) as store:
        pass
    with pytest.raises(sqlite3.ProgrammingError):
        store.get("a")


def test_wrong_schema_version_raises_job_mismatch(path: Path) -> None:
    """A file written by another schema version is refused rather than misread."""
    Store(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE meta SET value = '999' WHERE name = 'schema'")
        db.commit()
    with pytest.raises(JobMismatch, match=rf"\(schema 999, this one reads {SCHEMA_VERSION}\)"):
        Store(path)


def test_job_mismatch_is_a_configuration_error_importable_from_the_store() -> None:
    """JobMismatch lives in the error tree (a ConfigurationError) and is still importable
    from llmbatch.store, where it is raised."""
    assert JobMismatch is llmbatch.JobMismatch
    assert issubclass(JobMismatch, ConfigurationError)


# -- saving and reading items ----------------------------------------------------------


def test_save_response_then_get(store: Store) -> None:
    """A saved response comes back as a done item holding the response record."""
    response = Response(
        text="a summary",
        model="gpt-4o-mini-2024-07-18",
        usage=Usage(input_tokens=120, output_tokens=30, cached_tokens=64),
        finish_reason="stop",
        request_id="req_123",
        latency=1.234567,
        attempts=2,
        key="k1",
        cost=0.0015,
        headers={"x-ratelimit-remaining-requests": "4999", "openai-organization": "org-x"},
    )
    before = time.time()
    store.save_response(
        "k1", index=4, source="docs.jsonl:5", fingerprint="fp-k1", response=response
    )
    after = time.time()

    item = store.get("k1")
    assert item is not None
    expected_response = {
        "text": "a summary",
        "parsed": None,
        "model": "gpt-4o-mini-2024-07-18",
        "finish_reason": "stop",
        "request_id": "req_123",
        "usage": {"input_tokens": 120, "output_tokens": 30, "cached_tokens": 64},
        "cost": 0.0015,
        "attempts": 2,
        "latency": 1.2346,
    }
    expected = StoredItem(
        key="k1",
        index=4,
        source="docs.jsonl:5",
        fingerprint="fp-k1",
        status="done",
        response=expected_response,
        error=None,
        updated=item.updated,
    )
    assert expected == item
    assert before <= item.updated <= after
    assert StoreSummary(1, 0, 0, 120, 30, 0.0015) == store.summary()


def test_parsed_json_round_trips(store: Store) -> None:
    """A JSON-mode response keeps its parsed value."""
    parsed = {"label": "spam", "scores": [0.5, 0.25], "nested": {"ok": True, "none": None}}
    _done(store, "k", 0, text='{"label": "spam"}', parsed=parsed)
    item = store.get("k")
    assert item is not None
    assert item.response is not None
    assert parsed == item.response["parsed"]


def test_headers_are_never_stored(store: Store, path: Path) -> None:
    """Response headers are in neither the record nor the file."""
    headers = {"x-ratelimit-remaining-tokens": "149000", "set-cookie": "__cf_bm=cookie-value"}
    response = _response(headers=headers)
    assert "headers" not in response_record(response)
    store.save_response("k", index=0, source="s", fingerprint="fp", response=response)
    item = store.get("k")
    assert item is not None
    assert item.response is not None
    assert "headers" not in item.response
    store.close()
    data = _file_bytes(path)
    assert b"an answer" in data  # the response itself is on disk...
    assert b"x-ratelimit-remaining-tokens" not in data  # ...its headers are not
    assert b"cookie-value" not in data


@pytest.mark.parametrize(
    ("error", "invalid", "status", "expected_error"),
    [
        (
            ItemError(index=3, key="k", error_type="RateLimited", message="slow down", attempts=4),
            False,
            "failed",
            {"type": "RateLimited", "message": "slow down", "attempts": 4},
        ),
        (
            ItemError.from_exception(3, ValueError("bad template")),
            False,
            "failed",
            {"type": "ValueError", "message": "bad template", "attempts": 1},
        ),
        (
            "line 4: not valid JSON",
            True,
            "invalid",
            {"type": "InvalidInput", "message": "line 4: not valid JSON", "attempts": 0},
        ),
        (
            "template needs {text}",
            False,
            "failed",
            {"type": "InvalidInput", "message": "template needs {text}", "attempts": 0},
        ),
    ],
)
def test_save_error_then_get(
    store: Store,
    error: ItemError | str,
    invalid: bool,
    status: str,
    expected_error: dict[str, Any],
) -> None:
    """A saved error comes back with its status and error record, and no response."""
    store.save_error(
        "k", index=3, source="docs.jsonl:4", fingerprint=None, error=error, invalid=invalid
    )
    item = store.get("k")
    assert item is not None
    expected = StoredItem(
        key="k",
        index=3,
        source="docs.jsonl:4",
        fingerprint=None,
        status=status,
        response=None,
        error=expected_error,
        updated=item.updated,
    )
    assert expected == item
    assert expected_error == error_record(error)


def test_a_failed_item_later_done_is_replaced(store: Store) -> None:
    """Saving a key again replaces it: a retried item that succeeds is simply done."""
    _failed(store, "k", 0)
    _done(store, "k", 0, text="second time lucky")
    item = store.get("k")
    assert item is not None
    assert ("done", None) == (item.status, item.error)
    assert item.response is not None
    assert "second time lucky" == item.response["text"]
    assert ["k"] == [i.key for i in store.items()]
    assert StoreSummary(1, 0, 0, 10, 5, None) == store.summary()


def test_a_done_item_saved_as_failed_is_replaced(store: Store) -> None:
    """Replacement works both ways: the latest save is the item."""
    _done(store, "k", 0, cost=0.5)
    _failed(store, "k", 0)
    assert StoreSummary(0, 1, 0, 0, 0, None) == store.summary()


@pytest.mark.parametrize("n", [0, 1, 499, 500, 501, 1000, 1203])
def test_get_many_across_chunks(store: Store, n: int) -> None:
    """get_many finds every stored key however many are asked for (500 per query)."""
    for i in range(n):
        _done(store, f"k{i:05d}", i)
    wanted = (f"k{i:05d}" for i in range(n + 40))  # any iterable; 40 were never saved
    found = store.get_many(wanted)
    assert {f"k{i:05d}" for i in range(n)} == set(found)
    assert list(range(n)) == sorted(item.index for item in found.values())
    assert all(key == item.key for key, item in found.items())


def test_get_many_with_repeated_keys(store: Store) -> None:
    """Asking twice for one key returns it once."""
    _done(store, "a", 0)
    assert ["a"] == list(store.get_many(["a", "a", "missing", "a"]))


def test_items_are_in_input_order(store: Store) -> None:
    """items() follows the input index (then the key), not the order of saving."""
    _done(store, "third", 2)
    _failed(store, "first", 0)
    _done(store, "second-b", 1)
    _failed(store, "second-a", 1, invalid=True)
    assert ["first", "second-a", "second-b", "third"] == [i.key for i in store.items()]


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ((), ["d0", "f1", "i2", "d3"]),
        (("done",), ["d0", "d3"]),
        (("failed",), ["f1"]),
        (("invalid",), ["i2"]),
        (("failed", "invalid"), ["f1", "i2"]),
        (("invalid", "done"), ["d0", "i2", "d3"]),
    ],
)
def test_items_filtered_by_status(
    store: Store, statuses: tuple[str, ...], expected: list[str]
) -> None:
    """items(*statuses) yields only the items of those statuses, still in input order."""
    _done(store, "d0", 0)
    _failed(store, "f1", 1)
    _failed(store, "i2", 2, invalid=True)
    _done(store, "d3", 3)
    assert expected == [item.key for item in store.items(*statuses)]


@pytest.mark.parametrize(
    ("statuses", "bad"),
    [(("pending",), "pending"), (("done", "Done"), "Done"), (("failed", "skipped"), "skipped")],
)
def test_items_unknown_status_raises(store: Store, statuses: tuple[str, ...], bad: str) -> None:
    """A status that is not done/failed/invalid is a ValueError naming it."""
    with pytest.raises(ValueError, match=rf"unknown status '{bad}': use done, failed, invalid"):
        list(store.items(*statuses))


# -- summary ---------------------------------------------------------------------------


def test_summary_counts_tokens_and_cost(store: Store) -> None:
    """summary() counts each status and totals tokens and the known costs."""
    _done(store, "a", 0, input_tokens=100, output_tokens=20, cost=0.25)
    _done(store, "b", 1, input_tokens=50, output_tokens=7, cost=0.5)
    _done(store, "c", 2, input_tokens=1, output_tokens=1, cost=None)  # an unpriced model
    _failed(store, "d", 3)
    _failed(store, "e", 4, invalid=True)
    _failed(store, "f", 5, invalid=True)
    summary = store.summary()
    assert StoreSummary(3, 1, 2, 151, 28, 0.75) == summary
    assert 6 == summary.total


def test_summary_cost_is_none_when_nothing_was_priced(store: Store) -> None:
    """Without a single priced item the cost is unknown (None), not 0."""
    _done(store, "a", 0, cost=None)
    _failed(store, "b", 1)
    assert StoreSummary(1, 1, 0, 10, 5, None) == store.summary()


def test_summary_cost_of_free_items_is_zero(store: Store) -> None:
    """A priced item that cost nothing makes the cost known: 0.0."""
    _done(store, "a", 0, cost=0.0)
    assert StoreSummary(1, 0, 0, 10, 5, 0.0) == store.summary()


# -- the job ---------------------------------------------------------------------------


def test_begin_records_the_job(store: Store) -> None:
    """begin() records the fingerprint and the description."""
    store.begin("fp-1", DESCRIPTION)
    assert "fp-1" == store.fingerprint()
    assert DESCRIPTION == store.job()


def test_begin_same_fingerprint_again_keeps_the_items(store: Store) -> None:
    """Beginning the same job again (a resume) is accepted and keeps what was saved."""
    store.begin("fp-1", DESCRIPTION)
    _done(store, "a", 0)
    store.begin("fp-1", DESCRIPTION)
    assert "fp-1" == store.fingerprint()
    assert ["a"] == [item.key for item in store.items()]


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"model": "gpt-4o"}, "(changed: model)"),
        ({"temperature": 0.7, "template": "Translate: {text}"}, "(changed: temperature, template)"),
        ({"system": "be brief", "extra": 1}, "(changed: extra, system)"),
        ({}, "(changed: request parameters)"),
    ],
)
def test_begin_another_job_raises_job_mismatch(
    path: Path, changes: dict[str, Any], named: str
) -> None:
    """Another fingerprint is refused, naming what changed and the --fresh way out."""
    with Store(path) as store:
        store.begin("fp-1", DESCRIPTION)
        _done(store, "a", 0)
    with Store(path) as store:
        with pytest.raises(JobMismatch) as caught:
            store.begin("fp-2", {**DESCRIPTION, **changes})
        message = str(caught.value)
        assert named in message
        assert "--fresh" in message
        assert str(path) in message
        # nothing was touched
        assert "fp-1" == store.fingerprint()
        assert DESCRIPTION == store.job()
        assert ["a"] == [item.key for item in store.items()]


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ({"model": "m", "system": "be brief"}, {"model": "m"}, "(changed: system)"),
        ({"model": "m", "stop": ("END",)}, {"model": "m2", "stop": ("END",)}, "(changed: model)"),
    ],
)
def test_job_mismatch_names_exactly_the_changed_fields(
    store: Store, old: dict[str, Any], new: dict[str, Any], named: str
) -> None:
    """The mismatch names dropped fields, and never a field whose value is unchanged."""
    store.begin("fp-1", old)
    with pytest.raises(JobMismatch) as caught:
        store.begin("fp-2", new)
    assert named in str(caught.value)


def test_begin_fresh_discards_the_old_job(path: Path) -> None:
    """fresh=True empties the store and claims it for the new job, durably."""
    other = {**DESCRIPTION, "model": "gpt-4o"}
    with Store(path) as store:
        store.begin("fp-1", DESCRIPTION)
        _done(store, "a", 0, cost=0.25)
        _failed(store, "b", 1)
        store.begin("fp-2", other, fresh=True)
        assert [] == list(store.items())
        assert store.get("a") is None
        assert StoreSummary(0, 0, 0, 0, 0, None) == store.summary()
    with Store(path) as store:
        assert "fp-2" == store.fingerprint()
        assert other == store.job()
        store.begin("fp-2", other)  # the new job is now the store's own


def test_begin_fresh_on_the_same_job_also_empties(store: Store) -> None:
    """fresh=True discards the items even when the job is unchanged."""
    store.begin("fp-1", DESCRIPTION)
    _done(store, "a", 0)
    store.begin("fp-1", DESCRIPTION, fresh=True)
    assert "fp-1" == store.fingerprint()
    assert [] == list(store.items())


# -- secrets ---------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["sk-proj-", "sk-ant-", "sk-", "Bearer "])
@pytest.mark.parametrize("kind", ["item_error", "invalid_str"])
def test_api_keys_in_errors_never_reach_the_file(path: Path, prefix: str, kind: str) -> None:
    """A key inside an error message is redacted before it is written: not in any file
    byte (database, WAL) while open or after closing; only its last 4 characters remain."""
    secret = prefix + CANARY_BODY
    message = f"marker-5150: Incorrect API key provided: {secret}. See the docs."
    error: ItemError | str = (
        ItemError(index=0, error_type="AuthenticationFailed", message=message)
        if kind == "item_error"
        else message
    )
    with Store(path) as store:
        store.save_error(
            "k", index=0, source="s", fingerprint=None, error=error, invalid=kind == "invalid_str"
        )
        item = store.get("k")
        assert item is not None
        assert item.error is not None
        expected = f"marker-5150: Incorrect API key provided: {prefix}…{CANARY_BODY[-4:]}."
        assert f"{expected} See the docs." == item.error["message"]
        while_open = _file_bytes(path)
    after_close = _file_bytes(path)
    for data in (while_open, after_close):
        assert b"marker-5150" in data  # the message itself is on disk...
        assert CANARY_BODY[:20].encode() not in data  # ...the key is not
        assert CANARY_BODY[-24:].encode() not in data


def test_an_answer_that_stayed_invalid_keeps_what_it_cost(store: Store) -> None:
    """An item failed as InvalidOutput was paid for (its first call and re-asks): the
    store counts its tokens and cost in the job's totals, unlike other failures."""
    paid = InvalidOutput(raw="nope", errors=["not JSON"], attempts=2)
    paid.input_tokens, paid.output_tokens, paid.cost = 120, 30, 0.004
    other = ItemError.from_exception(1, llmbatch.BadRequest("no"))
    store.save_error(
        "a", index=0, source="d:1", fingerprint="f", error=ItemError.from_exception(0, paid)
    )
    store.save_error("b", index=1, source="d:2", fingerprint="f", error=other)
    summary = store.summary()
    assert (2, 120, 30) == (summary.failed, summary.input_tokens, summary.output_tokens)
    assert summary.cost == pytest.approx(0.004)
