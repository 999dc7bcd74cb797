"""The providers' Batch APIs: half the price, the same results, resumable after a crash.

:func:`run_batch_api` takes ``(key, Request)`` pairs and returns, per key, the same
:class:`~llmbatch.models.Response` or :mod:`llmbatch.errors` exception the online path
would have produced. The lifecycle, shared by both providers::

    requests ──► custom ids (stable per item) ──► split under the provider's limits
      ──► submit ──► journal (batch id + its items, committed before any waiting)
      ──► poll with backoff ──► download ──► join on custom_id ──► outcomes
            │                                       │
            └─ rejected as a whole: the reasons     └─ expired / cancelled / 5xx items:
               (enqueued-token limit: wait, retry)     resubmitted in a new batch

A process killed while batches run loses nothing: rerun with the same journal (the
job's :class:`~llmbatch.store.Store`) and it resumes **polling** the recorded batches
and downloads again the results of those it had already collected; it never submits
(pays for) their requests again. Each item keeps its own resubmit budget, and an item
that no batch can take (too large) ends as its own error. Ctrl-C leaves batches
running on the provider's side; :func:`cancel_batches` stops them. A cancelled batch
is collected like any other once the provider has ended it: the requests it ran
before the cancel were delivered and billed, so their results are kept, and only
those it never ran are submitted again.

This module is what every Batch API has in common: the :class:`BatchBackend` protocol,
the journal, the lifecycle and the custom ids. Each provider's module owns its backend
(:class:`~llmbatch.providers.openai.OpenAIBatchBackend`: ``/v1/files`` + ``/v1/batches``,
one model per file, ≤ 50,000 requests and ≤ 200 MB;
:class:`~llmbatch.providers.anthropic.AnthropicBatchBackend`: Message Batches,
≤ 100,000 requests or 256 MB), built by ``provider.batch()`` (:class:`SupportsBatch`).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from llmbatch._log import get_logger
from llmbatch.errors import (
    BadRequest,
    BatchExpired,
    FatalError,
    LLMBatchError,
    TransientError,
)
from llmbatch.models import Embedding, EmbeddingRequest, Request, Response

__all__ = [
    "AnyRequest",
    "BatchBackend",
    "BatchLimits",
    "BatchStatus",
    "Journal",
    "MemoryJournal",
    "Outcome",
    "StoredBatch",
    "SupportsBatch",
    "batch_backend",
    "cancel_batches",
    "custom_id_for",
    "run_batch_api",
    "uncollected_keys",
]

logger = get_logger("llmbatch.batchapi")

AnyRequest = Request | EmbeddingRequest
Outcome = Response | Embedding | LLMBatchError

#: how many times one item may be in a batch rejected for the enqueued-token limit
_MAX_REJECTIONS = 50
#: journal statuses of batches that may have run (and billed) their items; a batch
#: rejected as a whole (``failed``) ran nothing
_MAY_HAVE_RUN = ("submitted", "cancelled", "collected")
#: journal statuses of batches whose results are still to be collected: it runs, or it
#: was cancelled and what it ran before the cancel is still to be downloaded
_UNCOLLECTED = ("submitted", "cancelled")
_CUSTOM_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def custom_id_for(key: str) -> str:
    """The ``custom_id`` of the item *key*: the key itself when both providers accept it
    (1-64 of ``[A-Za-z0-9_-]``), else a hash of it; the same key always gives the same
    id, so a resubmission or a resumed run recognises its items."""
    if _CUSTOM_ID.match(key):
        return key
    return "h-" + hashlib.sha256(key.encode()).hexdigest()[:40]


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """What one batch may hold."""

    max_requests: int
    max_bytes: int
    one_model: bool


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """Where a batch stands.

    Attributes:
        id: the batch id.
        state: ``"running"``, ``"ended"`` (results can be read) or ``"failed"``
            (rejected as a whole; ``errors`` says why).
        provider_status: the provider's own word (``validating``, ``in_progress``...).
        counts: request counts as the provider reports them.
        errors: why a failed batch was rejected.
        retryable: a failed batch may succeed later (the enqueued-token limit).
    """

    id: str
    state: str
    provider_status: str
    counts: Mapping[str, int] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    retryable: bool = False


@runtime_checkable
class BatchBackend(Protocol):
    """A provider's Batch API."""

    name: str
    limits: BatchLimits

    def line(self, custom_id: str, request: AnyRequest) -> dict[str, Any]:
        """The batch line (or entry) for *request*."""
        ...

    async def submit(self, lines: Sequence[Mapping[str, Any]], *, model: str | None) -> str:
        """Create a batch of *lines*; its id. Raises :mod:`llmbatch.errors` exceptions."""
        ...

    async def status(self, batch_id: str) -> BatchStatus:
        """Where the batch stands."""
        ...

    def results(self, batch_id: str) -> AsyncIterator[tuple[str, Any]]:
        """``(custom_id, raw result)`` for every request of an ended batch, any order."""
        ...

    def outcome(self, raw: Any, request: AnyRequest) -> Outcome:
        """The Response or error a raw result stands for."""
        ...

    async def cancel(self, batch_id: str) -> None:
        """Ask the provider to stop the batch."""
        ...


@runtime_checkable
class SupportsBatch(Protocol):
    """A provider with a Batch API: its module owns the backend (OpenAI's in
    :mod:`llmbatch.providers.openai`, Anthropic's in :mod:`llmbatch.providers.anthropic`)."""

    def batch(self) -> BatchBackend:
        """This provider's Batch API."""
        ...


def batch_backend(provider: object) -> BatchBackend | None:
    """The Batch API of *provider*, or ``None`` if it has none."""
    return provider.batch() if isinstance(provider, SupportsBatch) else None


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """A Batch API batch a journal recorded (the job's checkpoint store keeps them).

    Attributes:
        id: the provider's batch id.
        provider: the provider's name.
        status: ``"submitted"`` (results not collected yet), ``"collected"``,
            ``"failed"`` (rejected as a whole) or ``"cancelled"``.
        items: ``{custom_id: item key}`` of the requests it holds.
        attempt: 1 for a first submission, more for resubmissions.
    """

    id: str
    provider: str
    status: str
    items: dict[str, str]
    attempt: int
    created: float


class Journal(Protocol):
    """Where submitted batches are recorded (a :class:`~llmbatch.store.Store`)."""

    def save_batch(
        self, batch_id: str, *, provider: str, items: Mapping[str, str], attempt: int = 1
    ) -> None: ...

    def set_batch_status(self, batch_id: str, status: str) -> None: ...

    def batches(self, *statuses: str, provider: str | None = None) -> list[StoredBatch]: ...


class MemoryJournal:
    """A journal in memory: for callers without a store (a crash forgets the batches)."""

    def __init__(self) -> None:
        self._batches: dict[str, StoredBatch] = {}

    def save_batch(
        self, batch_id: str, *, provider: str, items: Mapping[str, str], attempt: int = 1
    ) -> None:
        """Record a submitted batch."""
        self._batches[batch_id] = StoredBatch(
            batch_id, provider, "submitted", dict(items), attempt, 0.0
        )

    def set_batch_status(self, batch_id: str, status: str) -> None:
        """Change a batch's status."""
        old = self._batches[batch_id]
        self._batches[batch_id] = StoredBatch(
            old.id, old.provider, status, old.items, old.attempt, old.created
        )

    def batches(self, *statuses: str, provider: str | None = None) -> list[StoredBatch]:
        """The recorded batches."""
        return [
            b
            for b in self._batches.values()
            if (not statuses or b.status in statuses) and provider in (None, b.provider)
        ]


# -- the lifecycle ---------------------------------------------------------------------


@dataclass(slots=True)
class _Item:
    key: str
    request: AnyRequest
    #: submissions that may have run it (or failed to reach the provider): its own
    #: resubmit budget, never shared with the other items of a batch
    attempts: int = 0
    #: times it was in a batch rejected for the enqueued-token limit
    rejections: int = 0
    #: seconds it waited for queue room while none of this job's batches ran
    queued: float = 0.0


async def run_batch_api(
    backend: BatchBackend,
    requests: Sequence[tuple[str, AnyRequest]],
    *,
    journal: Journal | None = None,
    on_result: Callable[[str, Outcome], None] | None = None,
    poll_interval: float = 15.0,
    max_poll_interval: float = 300.0,
    resubmits: int = 2,
    queue_wait: float = 3600.0,
    reuse_collected: bool = True,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> dict[str, Outcome]:
    """Answer *requests* through *backend*'s Batch API.

    A batch rejected for the provider's enqueued-token limit ran nothing, so its items
    are submitted again without spending an attempt: as soon as one of this job's
    batches ends (that made room), or, when none of them runs (other jobs' batches
    hold the queue, or the batch is too large to ever fit: the provider does not say
    which), after a wait that starts at *poll_interval* and grows by half each time up
    to *max_poll_interval*. Items that would wait so for more than *queue_wait*
    seconds in all end as :class:`~llmbatch.errors.BadRequest` saying why. Either
    way one item is in at most 50 rejected batches (``_MAX_REJECTIONS``).

    Args:
        backend: the provider's batch backend (``provider.batch()``).
        requests: ``(key, Request)`` pairs; keys must be unique.
        journal: records every submitted batch before waiting on it. A rerun with the
            same journal pays for nothing twice: the batches it holds for these keys
            that still run are polled, not submitted again; cancelled ones are polled
            until they end, then their results are collected (only what they never
            ran is submitted again); and those already collected give their results
            again (see *reuse_collected*).
        on_result: called with ``(key, Response or error)`` as each item ends.
        poll_interval: seconds before the first status check; it grows by half each
            time nothing ends, up to *max_poll_interval*.
        resubmits: how many times an item that did not run (its batch expired or was
            cancelled before it ran, a 5xx, a submission that failed) is submitted
            again before its error is final. Each item counts its own, wherever it is
            resubmitted, across reruns: every batch of the journal that may have run it
            (``submitted``, ``cancelled`` or ``collected``) counts.
        queue_wait: the longest, in seconds, that items rejected for the
            enqueued-token limit wait for room while none of this job's batches runs
            (``0``: they fail at the first such rejection).
        reuse_collected: items of batches the journal holds as collected are answered
            from those batches' results, downloaded again. ``False`` submits them
            anew with a whole budget instead: for a caller that keeps the outcomes
            itself (a job's store) and passes only what it wants answered again. It
            never applies to batches not collected yet (running or cancelled): their
            results are collected either way (see :func:`uncollected_keys`).
        sleep: how waiting is done (injectable for tests).

    Returns:
        ``{key: Response or LLMBatchError}`` for every key.

    Raises:
        ValueError: duplicate keys.
        LLMBatchError: a fatal error (authentication, quota, a batch the provider does
            not know) while submitting, polling or downloading.
    """
    journal = journal if journal is not None else MemoryJournal()
    items: dict[str, _Item] = {}
    for key, request in requests:
        cid = custom_id_for(key)
        if cid in items:
            raise ValueError(f"duplicate item key {key!r}: batch items need unique keys")
        items[cid] = _Item(key, request)
    outcomes: dict[str, Outcome] = {}

    def finish(cid: str, outcome: Outcome) -> None:
        item = items[cid]
        outcomes[item.key] = outcome
        if on_result is not None:
            on_result(item.key, outcome)

    active: dict[str, set[str]] = {}  # batch id -> custom ids not finished yet
    todo = await _resume(backend, journal, items, active, finish, resubmits, reuse_collected)
    interval = poll_interval

    # Items of batches rejected for the enqueued-token limit wait here for room; a
    # rejection is not an execution, so it costs no attempt.
    waiting: list[str] = []
    while todo or active or waiting:
        if todo:
            todo = await _submit(backend, journal, items, todo, active, finish, resubmits)
        if not active:
            # None of this job's batches runs: what is left failed to reach the
            # provider (todo), or was rejected while other jobs' batches held the
            # queue or because it can never fit (waiting). Wait, backing off, and try
            # again; the rejected give up once they have waited queue_wait.
            kept: list[str] = []
            for cid in waiting:
                item = items[cid]
                if item.queued + interval > queue_wait:
                    finish(cid, _no_room(backend, item))
                else:
                    kept.append(cid)
            if todo or kept:
                await sleep(interval)
                for cid in kept:
                    items[cid].queued += interval
                interval = min(interval * 1.5, max_poll_interval)
            todo, waiting = todo + kept, []
            continue
        await sleep(interval)
        ended_any = False
        for batch_id in list(active):
            try:
                status = await backend.status(batch_id)
            except TransientError as exc:  # the batch runs on; ask again next time
                logger.warning("batch.poll_failed", batch_id=batch_id, error=str(exc))
                continue
            if status.state == "running":
                logger.debug(
                    "batch.progress",
                    batch_id=batch_id,
                    status=status.provider_status,
                    **{k: v for k, v in status.counts.items() if isinstance(v, int)},
                )
                continue
            cids = active.pop(batch_id)
            if status.state == "failed":
                journal.set_batch_status(batch_id, "failed")
                logger.warning("batch.failed", batch_id=batch_id, errors=list(status.errors))
                error = BadRequest(
                    "the batch was rejected: " + "; ".join(status.errors or ("no reason given",)),
                    provider=backend.name,
                )
                for cid in sorted(cids):
                    item = items[cid]
                    item.rejections += 1
                    if status.retryable and item.rejections <= _MAX_REJECTIONS:
                        item.attempts -= 1
                        waiting.append(cid)
                    else:
                        finish(cid, error)
                continue
            ended_any = True
            # (OpenAI says "cancelled"; Anthropic only "ended", with canceled requests)
            cancelled = status.provider_status == "cancelled" or bool(status.counts.get("canceled"))
            todo += await _collect(
                backend, batch_id, cids, items, finish, resubmits, cancelled=cancelled
            )
            journal.set_batch_status(batch_id, "collected")
        if ended_any and waiting:
            todo, waiting = todo + waiting, []
        interval = poll_interval if ended_any else min(interval * 1.5, max_poll_interval)
    return outcomes


def _no_room(backend: BatchBackend, item: _Item) -> BadRequest:
    """Why an item rejected for the enqueued-token limit stopped waiting for room."""
    return BadRequest(
        "the batch exceeds the provider's enqueued-token limit on its own, or other "
        f"batches kept the queue full: rejected {item.rejections} times, after "
        f"{item.queued:g} s of waiting with none of this job's batches running; submit "
        "smaller batches (BatchLimits.max_requests) or wait longer (queue_wait)",
        provider=backend.name,
        model=item.request.model,
    )


async def _resume(
    backend: BatchBackend,
    journal: Journal,
    items: dict[str, _Item],
    active: dict[str, set[str]],
    finish: Callable[[str, Outcome], None],
    resubmits: int,
    reuse_collected: bool,
) -> list[str]:
    """Take up what the journal holds for *items*; the ids to submit.

    Each item's latest batch decides: one still ``submitted`` goes into *active* (to be
    polled), and so does one ``cancelled`` (it is collected once the provider has
    ended it: what it ran before the cancel is paid for); one ``collected`` gives its
    results again (when *reuse_collected*). Every such batch holding the item counts
    as one of its attempts. Rejected batches ran nothing: not an attempt.
    """
    latest, runs = _journal_view(journal, backend.name)
    latest = {cid: stored for cid, stored in latest.items() if cid in items}
    for cid in latest:
        items[cid].attempts += runs[cid]
    collected: dict[str, set[str]] = {}
    cancelled: set[str] = set()
    for cid, stored in latest.items():
        if stored.status in _UNCOLLECTED:
            active.setdefault(stored.id, set()).add(cid)
            if stored.status == "cancelled":
                cancelled.add(stored.id)
        elif reuse_collected:
            collected.setdefault(stored.id, set()).add(cid)
        else:
            items[cid].attempts = 0  # to be answered anew
    for batch_id, cids in active.items():
        if batch_id in cancelled:
            logger.info(
                "batch.resumed",
                batch_id=batch_id,
                requests=len(cids),
                detail="cancelled: collecting what it ran before the cancel",
            )
        else:
            logger.info("batch.resumed", batch_id=batch_id, requests=len(cids))
    held = set().union(*active.values(), *collected.values())
    todo: list[str] = []
    for batch_id, cids in collected.items():
        logger.info("batch.reused", batch_id=batch_id, requests=len(cids))
        todo += await _collect(backend, batch_id, cids, items, finish, resubmits)
    return todo + [cid for cid in items if cid not in held]


def uncollected_keys(journal: Journal, *, provider: str | None = None) -> set[str]:
    """The keys of the items whose latest batch in *journal* has results not collected
    yet: it still runs (``submitted``), or it was cancelled and what it ran before the
    cancel is still to be downloaded (``cancelled``).

    :func:`run_batch_api` given such an item polls that batch and takes its result from
    it (or submits it again if the batch never ran it), even with
    ``reuse_collected=False``; sending the item any other way would pay for it twice.
    """
    latest, _ = _journal_view(journal, provider)
    return {stored.items[cid] for cid, stored in latest.items() if stored.status in _UNCOLLECTED}


def _journal_view(
    journal: Journal, provider: str | None
) -> tuple[dict[str, StoredBatch], collections.Counter[str]]:
    """Per custom id, the latest journal batch that may have run it, and how many did."""
    latest: dict[str, StoredBatch] = {}
    runs: collections.Counter[str] = collections.Counter()
    for stored in journal.batches(*_MAY_HAVE_RUN, provider=provider):  # oldest first
        for cid in stored.items:
            latest[cid] = stored
            runs[cid] += 1
    return latest, runs


async def _submit(
    backend: BatchBackend,
    journal: Journal,
    items: dict[str, _Item],
    cids: list[str],
    active: dict[str, set[str]],
    finish: Callable[[str, Outcome], None],
    resubmits: int,
) -> list[str]:
    """Submit *cids* in as many batches as the limits need; the ids to try again later
    (a submission that failed with a transient error, while their resubmits last)."""
    later: list[str] = []
    chunks, refused = _chunks(backend, items, cids)
    for cid, error in refused.items():
        finish(cid, error)
    for model, chunk in chunks:
        lines = [backend.line(cid, items[cid].request) for cid in chunk]
        for cid in chunk:
            items[cid].attempts += 1
        try:
            batch_id = await backend.submit(lines, model=model)
        except TransientError as exc:
            again = [cid for cid in chunk if items[cid].attempts <= resubmits]
            logger.warning(
                "batch.submit_deferred",
                requests=len(again),
                given_up=len(chunk) - len(again),
                error=str(exc),
            )
            for cid in chunk:
                if items[cid].attempts > resubmits:
                    finish(cid, exc)
            later += again
            continue
        except LLMBatchError as exc:
            if isinstance(exc, FatalError):
                raise
            for cid in chunk:
                finish(cid, exc)
            continue
        attempt = max(items[cid].attempts for cid in chunk)
        journal.save_batch(
            batch_id,
            provider=backend.name,
            items={cid: items[cid].key for cid in chunk},
            attempt=attempt,
        )
        active[batch_id] = set(chunk)
        logger.info(
            "batch.submitted", batch_id=batch_id, requests=len(chunk), model=model, attempt=attempt
        )
    return later


def _chunks(
    backend: BatchBackend, items: dict[str, _Item], cids: list[str]
) -> tuple[list[tuple[str | None, list[str]]], dict[str, LLMBatchError]]:
    """Split *cids* by model (when the provider wants one per batch), count and bytes;
    also the ids that no batch can take, each with its error."""
    limits = backend.limits
    grouped: dict[tuple[str | None, str], list[str]] = {}
    for cid in cids:
        request = items[cid].request
        model = request.model if limits.one_model else None
        kind = type(request).__name__  # one endpoint per batch: chat or embeddings
        grouped.setdefault((model, kind), []).append(cid)
    chunks: list[tuple[str | None, list[str]]] = []
    refused: dict[str, LLMBatchError] = {}
    for (model, _), group in grouped.items():
        chunk: list[str] = []
        size = 0
        for cid in group:
            request = items[cid].request
            try:
                line = backend.line(cid, request)
            except BadRequest as exc:  # a request this API cannot take at all
                refused[cid] = exc
                continue
            line_size = len(json.dumps(line).encode()) + 1
            if line_size > limits.max_bytes:
                refused[cid] = BadRequest(
                    f"item {items[cid].key!r} alone exceeds the batch size limit "
                    f"({line_size:,} bytes; a batch holds at most {limits.max_bytes:,})",
                    provider=backend.name,
                    model=request.model,
                )
                continue
            if chunk and (len(chunk) >= limits.max_requests or size + line_size > limits.max_bytes):
                chunks.append((model, chunk))
                chunk, size = [], 0
            chunk.append(cid)
            size += line_size
        if chunk:
            chunks.append((model, chunk))
    return chunks, refused


async def _collect(
    backend: BatchBackend,
    batch_id: str,
    cids: set[str],
    items: dict[str, _Item],
    finish: Callable[[str, Outcome], None],
    resubmits: int,
    *,
    cancelled: bool = False,
) -> list[str]:
    """Join an ended batch's results to its items; the ids to submit again.

    An item with a result (an answer or its own error) is finished by it (a transient
    error is submitted again while its resubmits last), whether the batch completed,
    expired or was *cancelled*; one the batch never ran (reported so, or missing from
    its results) is submitted again while its resubmits last."""
    again: list[str] = []
    seen: set[str] = set()
    async for cid, raw in backend.results(batch_id):
        if cid not in cids or cid in seen:
            continue
        seen.add(cid)
        outcome = backend.outcome(raw, items[cid].request)
        if isinstance(outcome, TransientError) and items[cid].attempts <= resubmits:
            again.append(cid)
        else:
            finish(cid, outcome)
    for cid in sorted(cids - seen):  # never silently dropped
        if items[cid].attempts <= resubmits:
            again.append(cid)
        else:
            why = (
                "the batch was cancelled before this request ran"
                if cancelled
                else "missing from the batch's results"
            )
            finish(cid, BatchExpired(why, provider=backend.name, model=items[cid].request.model))
    logger.info(
        "batch.collected",
        batch_id=batch_id,
        finished=len(seen) - len([c for c in again if c in seen]),
        resubmitting=len(again),
    )
    return again


async def cancel_batches(backend: BatchBackend, journal: Journal) -> list[str]:
    """Cancel every batch the journal holds as submitted; the ids cancelled.

    A cancelled batch is marked ``cancelled`` in the journal: a rerun with the journal
    waits for the provider to end it, keeps the results of the requests it ran before
    the cancel (delivered and billed) and submits again only those it never ran.

    A batch that ended before it could be cancelled (the provider refuses: OpenAI
    answers 409, Anthropic 400) is skipped and the others are cancelled all the same.
    It stays ``submitted`` in the journal, so that a rerun collects the results it
    paid for (``failed`` if it was rejected as a whole). A cancel that fails while the
    batch still runs is raised once every other batch has been tried.
    """
    cancelled: list[str] = []
    failures: list[LLMBatchError] = []
    for stored in journal.batches("submitted", provider=backend.name):
        try:
            await backend.cancel(stored.id)
        except FatalError:
            raise
        except LLMBatchError as exc:
            try:
                status = await backend.status(stored.id)
            except TransientError:
                status = None
            if status is None or status.state == "running":
                logger.warning("batch.cancel_failed", batch_id=stored.id, error=str(exc))
                failures.append(exc)
                continue
            if status.state == "failed":
                journal.set_batch_status(stored.id, "failed")
            logger.info(
                "batch.cancel_skipped",
                batch_id=stored.id,
                status=status.provider_status,
                detail="it ended before it could be cancelled",
            )
            continue
        journal.set_batch_status(stored.id, "cancelled")
        cancelled.append(stored.id)
        logger.info("batch.cancelled", batch_id=stored.id)
    if failures:
        raise failures[0]
    return cancelled
