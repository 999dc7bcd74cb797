"""The checkpoint store: one SQLite file holding every finished item of a job.

A job (``llmbatch run``, or any caller) records each item as it finishes, keyed by the
item's stable key, with the fingerprint of the request that produced it. Rerunning the
job reads the store first: items already answered by the same request are not sent
again, so a crash, a Ctrl-C or a fatal error never makes anyone pay twice.

The file uses SQLite's write-ahead log in autocommit mode: every ``save_*`` is its own
transaction, durable against a killed process the moment it returns (``synchronous=
NORMAL``: only a power cut may lose the last few). Readers (``llmbatch status``) never
block the writer.

Nothing secret is stored: requests are kept only as fingerprints (a SHA-256 of the
model, messages and parameters), and error messages pass through
:func:`~llmbatch.errors.redact`.

An answer may be stored before it is *finished* (``save_response(finished=False)``): a
Batch API's typed answer, paid for, recorded the moment it is collected, and validated
(re-asked online when invalid) afterwards. Until its finished form replaces it, it is
:attr:`StoredItem.unfinished`: a rerun finishes it from the store instead of sending it
again, and the output shows it as pending.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from llmbatch.batchapi import StoredBatch
from llmbatch.errors import JobMismatch, redact
from llmbatch.failure import ItemError
from llmbatch.io import answer_fields
from llmbatch.models import Response, Usage
from llmbatch.structured import InvalidOutput

__all__ = [
    "JobMismatch",
    "Store",
    "StoreSummary",
    "StoredBatch",
    "StoredItem",
    "error_record",
    "response_from_record",
    "response_record",
]

SCHEMA_VERSION = "1"
#: the statuses an item may have in the store
STATUSES = ("done", "failed", "invalid")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    key           TEXT PRIMARY KEY,
    idx           INTEGER NOT NULL,
    source        TEXT NOT NULL,
    fingerprint   TEXT,
    status        TEXT NOT NULL CHECK (status IN ('done', 'failed', 'invalid')),
    response      TEXT,
    error         TEXT,
    input_tokens  INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cost          REAL,
    updated       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_by_status ON items (status, idx);
CREATE TABLE IF NOT EXISTS batches (
    id       TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    status   TEXT NOT NULL CHECK (status IN ('submitted', 'collected', 'failed', 'cancelled')),
    items    TEXT NOT NULL,
    attempt  INTEGER NOT NULL DEFAULT 1,
    created  REAL NOT NULL,
    updated  REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class StoredItem:
    """One item as the store recorded it.

    Attributes:
        key: the item's key.
        index: its position in the input of the run that recorded it.
        source: where it came from (``"docs.jsonl:3"``).
        fingerprint: the request's fingerprint (``None`` for unreadable input).
        status: ``"done"``, ``"failed"`` (the provider or the retry policy gave up) or
            ``"invalid"`` (the input could not become a request).
        response: the answer (:func:`response_record`), when done.
        error: ``{"type", "message", "attempts"}``, when not done.
        updated: when it was recorded (Unix time).
    """

    key: str
    index: int
    source: str
    fingerprint: str | None
    status: str
    response: dict[str, Any] | None
    error: dict[str, Any] | None
    updated: float

    @property
    def unfinished(self) -> bool:
        """An answer collected and paid for, but not finished yet (validated, re-asked):
        a rerun finishes it from :attr:`response` rather than sending it again."""
        return self.status == "done" and (self.response or {}).get("finished") is False


@dataclass(frozen=True, slots=True)
class StoreSummary:
    """Counts and totals over a store."""

    done: int
    failed: int
    invalid: int
    input_tokens: int
    output_tokens: int
    cost: float | None

    @property
    def total(self) -> int:
        """Items recorded, whatever their status."""
        return self.done + self.failed + self.invalid


def response_record(response: Response) -> dict[str, Any]:
    """What the store and the output keep of a :class:`Response` (never its headers); a
    typed answer as JSON values (:func:`~llmbatch.io.answer_fields`); a ``refusal`` and
    the ``reasks`` and the answering ``provider`` only when there are."""
    record: dict[str, Any] = {
        "text": response.text,
        "parsed": answer_fields(response.parsed),
        "model": response.model,
        "finish_reason": response.finish_reason,
        "request_id": response.request_id,
        "usage": {
            "input_tokens": response.usage.input_tokens,
            "output_tokens": response.usage.output_tokens,
            "cached_tokens": response.usage.cached_tokens,
        },
        "cost": response.cost,
        "attempts": response.attempts,
        "latency": round(response.latency, 4),
    }
    if response.usage.cache_write_tokens:  # (Anthropic's prompt cache only)
        record["usage"]["cache_write_tokens"] = response.usage.cache_write_tokens
    if response.provider is not None:  # (set by the client: a fallback's, when one answered)
        record["provider"] = response.provider
    if response.refusal is not None:
        record["refusal"] = response.refusal
    if response.reasks:
        record["reasks"] = response.reasks
    return record


def response_from_record(record: Mapping[str, Any]) -> Response:
    """The :class:`Response` a :func:`response_record` was made from, as far as it
    keeps it (its ``parsed`` as JSON values; no headers)."""
    usage = record.get("usage") or {}
    return Response(
        text=record.get("text") or "",
        model=record.get("model"),
        provider=record.get("provider"),
        usage=Usage(
            input_tokens=usage.get("input_tokens", 0),
            output_tokens=usage.get("output_tokens", 0),
            cached_tokens=usage.get("cached_tokens", 0),
            cache_write_tokens=usage.get("cache_write_tokens", 0),
        ),
        finish_reason=record.get("finish_reason"),
        request_id=record.get("request_id"),
        latency=record.get("latency") or 0.0,
        attempts=record.get("attempts") or 1,
        parsed=record.get("parsed"),
        refusal=record.get("refusal"),
        reasks=record.get("reasks") or 0,
        cost=record.get("cost"),
    )


def error_record(error: ItemError | str, *, attempts: int = 0) -> dict[str, Any]:
    """What the store and the output keep of an error (its message redacted). An
    :class:`~llmbatch.structured.InvalidOutput` also keeps the answer's ``raw`` text,
    what is wrong with it (``errors``) and the ``reasks`` spent on it."""
    if isinstance(error, str):
        return {"type": "InvalidInput", "message": redact(error), "attempts": attempts}
    record: dict[str, Any] = {
        "type": error.error_type,
        "message": redact(error.message),
        "attempts": error.attempts,
    }
    if isinstance(error.exception, InvalidOutput):
        record["raw"] = redact(error.exception.raw)
        record["errors"] = [redact(line) for line in error.exception.errors]
        record["reasks"] = error.exception.attempts
    return record


class Store:
    """A job's checkpoint in the SQLite file at *path* (created if missing).

    Use it as a context manager, or call :meth:`close`. One process writes; any number
    may read.
    """

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            version = self._meta("schema")
            if version is None:
                self._set_meta("schema", SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise JobMismatch(
                    f"{self.path} was written by another version of llmbatch "
                    f"(schema {version}, this one reads {SCHEMA_VERSION})"
                )
        except BaseException:
            self._db.close()
            raise

    def __repr__(self) -> str:
        return f"<Store {str(self.path)!r}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the database (everything saved is already committed)."""
        self._db.close()

    # -- the job -----------------------------------------------------------------------

    def job(self) -> dict[str, Any] | None:
        """The description of the job the store belongs to, or ``None`` if new."""
        raw = self._meta("job")
        return json.loads(raw) if raw is not None else None

    def fingerprint(self) -> str | None:
        """The fingerprint of the job the store belongs to, or ``None`` if new."""
        return self._meta("fingerprint")

    def begin(
        self, fingerprint: str, description: Mapping[str, Any], *, fresh: bool = False
    ) -> None:
        """Claim the store for the job with *fingerprint* (the prompt, model and
        parameters that make its requests).

        Args:
            fingerprint: the job's fingerprint.
            description: what to show about the job (``llmbatch status``).
            fresh: discard whatever the store holds first.

        Raises:
            JobMismatch: the store holds another job's results and *fresh* is false.
        """
        if fresh:
            self._db.execute("DELETE FROM items")
            self._db.execute("DELETE FROM batches")
            self._db.execute("DELETE FROM meta WHERE name IN ('job', 'fingerprint')")
        previous = self._meta("fingerprint")
        if previous is not None and previous != fingerprint:
            old = self.job() or {}
            new = json.loads(json.dumps(dict(description), default=str))
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            raise JobMismatch(
                f"{self.path} holds the results of a different job "
                f"(changed: {', '.join(changed) or 'request parameters'}); rerun with "
                "--fresh to discard them, or choose another store with --store"
            )
        self._set_meta("fingerprint", fingerprint)
        self._set_meta("job", json.dumps(dict(description), sort_keys=True, default=str))

    # -- items -------------------------------------------------------------------------

    def save_response(
        self,
        key: str,
        *,
        index: int,
        source: str,
        fingerprint: str,
        response: Response,
        finished: bool = True,
    ) -> None:
        """Record *key* as answered (committed when this returns); ``finished=False``
        for an answer still to be finished (see :attr:`StoredItem.unfinished`)."""
        record = response_record(response)
        if not finished:
            record["finished"] = False
        self._save(
            key,
            index=index,
            source=source,
            fingerprint=fingerprint,
            status="done",
            response=json.dumps(record, default=str),
            error=None,
            input_tokens=response.usage.input_tokens,
            output_tokens=response.usage.output_tokens,
            cost=response.cost,
        )

    def save_error(
        self,
        key: str,
        *,
        index: int,
        source: str,
        fingerprint: str | None,
        error: ItemError | str,
        invalid: bool = False,
    ) -> None:
        """Record *key* as failed (or as ``invalid`` input, never sent). An answer that
        stayed invalid keeps what its calls used and cost: they were paid for."""
        spent = error.exception if isinstance(error, ItemError) else None
        paid = spent if isinstance(spent, InvalidOutput) else None
        self._save(
            key,
            index=index,
            source=source,
            fingerprint=fingerprint,
            status="invalid" if invalid else "failed",
            response=None,
            error=json.dumps(error_record(error)),
            input_tokens=paid.input_tokens if paid else 0,
            output_tokens=paid.output_tokens if paid else 0,
            cost=paid.cost if paid else None,
        )

    def _save(self, key: str, **values: Any) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO items (key, idx, source, fingerprint, status, response, "
            "error, input_tokens, output_tokens, cost, updated) VALUES (:key, :index, "
            ":source, :fingerprint, :status, :response, :error, :input_tokens, "
            ":output_tokens, :cost, :updated)",
            {"key": key, "updated": time.time(), **values},
        )

    def get(self, key: str) -> StoredItem | None:
        """The item recorded under *key*, if any."""
        row = self._db.execute("SELECT * FROM items WHERE key = ?", (key,)).fetchone()
        return _item(row) if row is not None else None

    def get_many(self, keys: Iterable[str]) -> dict[str, StoredItem]:
        """The items recorded under *keys* (missing keys are left out)."""
        found: dict[str, StoredItem] = {}
        chunk: list[str] = []
        for key in keys:
            chunk.append(key)
            if len(chunk) == 500:
                found.update(self._get_chunk(chunk))
                chunk = []
        if chunk:
            found.update(self._get_chunk(chunk))
        return found

    def _get_chunk(self, keys: list[str]) -> dict[str, StoredItem]:
        marks = ",".join("?" * len(keys))
        rows = self._db.execute(f"SELECT * FROM items WHERE key IN ({marks})", keys)
        return {row["key"]: _item(row) for row in rows}

    def items(self, *statuses: str) -> Iterator[StoredItem]:
        """The recorded items (of the given statuses, default all) in input order."""
        for status in statuses:
            if status not in STATUSES:
                raise ValueError(f"unknown status {status!r}: use {', '.join(STATUSES)}")
        wanted = statuses or STATUSES
        marks = ",".join("?" * len(wanted))
        rows = self._db.execute(
            f"SELECT * FROM items WHERE status IN ({marks}) ORDER BY idx, key", wanted
        )
        for row in rows:
            yield _item(row)

    def summary(self) -> StoreSummary:
        """How many items are done, failed and invalid; tokens and money spent."""
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self._db.execute("SELECT status, COUNT(*) FROM items GROUP BY status"):
            counts[status] = n
        tokens_in, tokens_out, cost, priced = self._db.execute(
            "SELECT COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), "
            "SUM(cost), COUNT(cost) FROM items"
        ).fetchone()
        return StoreSummary(
            done=counts["done"],
            failed=counts["failed"],
            invalid=counts["invalid"],
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost=cost if priced else None,
        )

    # -- Batch API batches (the journal that makes a crash resume polling) ---------------

    def save_batch(
        self, batch_id: str, *, provider: str, items: Mapping[str, str], attempt: int = 1
    ) -> None:
        """Record a submitted batch and the items it holds (committed when this returns)."""
        now = time.time()
        self._db.execute(
            "INSERT OR REPLACE INTO batches (id, provider, status, items, attempt, created, "
            "updated) VALUES (?, ?, 'submitted', ?, ?, ?, ?)",
            (batch_id, provider, json.dumps(dict(items)), attempt, now, now),
        )

    def set_batch_status(self, batch_id: str, status: str) -> None:
        """Mark a batch ``collected``, ``failed`` or ``cancelled``."""
        self._db.execute(
            "UPDATE batches SET status = ?, updated = ? WHERE id = ?",
            (status, time.time(), batch_id),
        )

    def batches(self, *statuses: str, provider: str | None = None) -> list[StoredBatch]:
        """The recorded batches (of the given statuses and provider), oldest first."""
        query = "SELECT * FROM batches"
        where: list[str] = []
        args: list[Any] = []
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args += statuses
        if provider is not None:
            where.append("provider = ?")
            args.append(provider)
        if where:
            query += " WHERE " + " AND ".join(where)
        rows = self._db.execute(query + " ORDER BY created, id", args)
        return [
            StoredBatch(
                id=row["id"],
                provider=row["provider"],
                status=row["status"],
                items=json.loads(row["items"]),
                attempt=row["attempt"],
                created=row["created"],
            )
            for row in rows
        ]

    # -- meta --------------------------------------------------------------------------

    def _meta(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, name: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))


def _item(row: sqlite3.Row) -> StoredItem:
    return StoredItem(
        key=row["key"],
        index=row["idx"],
        source=row["source"],
        fingerprint=row["fingerprint"],
        status=row["status"],
        response=json.loads(row["response"]) if row["response"] else None,
        error=json.loads(row["error"]) if row["error"] else None,
        updated=row["updated"],
    )
