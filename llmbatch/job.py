"""A resumable job: input file → one request per record → checkpoint store → output file.

This is what ``llmbatch run`` does, usable from Python too::

    spec = JobSpec(input="docs.jsonl", output="out.jsonl", template="Summarize: {text}",
                   model="gpt-4o-mini")
    async with LLMClient(OpenAIProvider(), model=spec.model) as client:
        report = await run_job(spec, client)
    counts = write_output(spec)

The path of one record: :func:`~llmbatch.io.read_records` reads it (an unreadable one
is recorded as ``invalid``); :func:`prepare` builds its request and fingerprint (a
missing template field or an empty document is ``invalid`` too, with the record's
line); the store is asked first (answered by the same request already: not sent
again); otherwise the client answers it under the limits, retries and failure policy,
and the store records it the moment it finishes.

:func:`write_output` then writes one JSON line per input record, in input order, from
the store: ``ok`` with the answer, ``error`` with the reason, or ``pending`` when the
run stopped before reaching it (or a CSV/Parquet row each: see :meth:`JobSpec.output_columns`).
It writes a temporary file and renames it, so a crash never leaves a torn or duplicated
line; rerunning regenerates it.

A job with a response model (:attr:`JobSpec.response_model`) asks every request for a
typed answer: the client validates it (re-asking when it is invalid), the output line
holds it under ``"parsed"``, and an answer still invalid after the re-asks is an error
line with its raw text and what is wrong with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import hashlib
import json
import os
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from llmbatch._log import get_logger
from llmbatch.batchapi import batch_backend, run_batch_api, uncollected_keys
from llmbatch.client import LLMClient, build_request, template_fields
from llmbatch.concurrency import SAFETY_CAP
from llmbatch.config import ModelProfile, profile_for
from llmbatch.errors import FatalError, LLMBatchError
from llmbatch.failure import BatchFailed, ItemError, OnError, failure_strategy, is_fatal
from llmbatch.io import (
    AtomicFile,
    ColumnKind,
    Record,
    TableWriter,
    check_output_format,
    detect_output_format,
    field_kinds,
    read_records,
)
from llmbatch.limits import Limits
from llmbatch.models import Embedding, Request, Response, Usage
from llmbatch.routing import Mode, Prefer, estimated_usage, plan
from llmbatch.runner import stream_batch
from llmbatch.store import Store, StoredItem, error_record, response_from_record
from llmbatch.structured import ResponseModel, ResponseSchema

__all__ = [
    "DEFAULT_TEMPLATE",
    "Coverage",
    "Estimate",
    "JobProgress",
    "JobReport",
    "JobSpec",
    "OutputCounts",
    "cache_coverage",
    "estimate_job",
    "prepare",
    "run_job",
    "write_output",
]

logger = get_logger("llmbatch.job")

#: the prompt when none is given: summarize the record's ``text`` field
DEFAULT_TEMPLATE = "Summarize the following document in one or two sentences.\n\n{text}"


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """What a job does. Two runs with the same spec are the same job (see
    :meth:`fingerprint`), so the second resumes the first.

    Args:
        input: a JSONL/CSV/Parquet file, a folder of text files, or ``-`` (stdin).
        output: the JSONL file to write.
        template: a ``str.format`` template over each record's fields.
        model: the model.
        provider: the provider's name and address (part of the fingerprint).
        system: a system prompt.
        max_tokens: the output cap of every request.
        temperature: the sampling temperature.
        json_mode: ask for a JSON object and keep it parsed in the output.
        response_model: a typed answer for every record: a pydantic model class, a JSON
            Schema dict or a :class:`~llmbatch.structured.ResponseSchema` (kept as
            one: :attr:`schema`). Its fingerprint is part of the job's: another schema
            is another job. Excludes *json_mode*.
        format: the input format (default: from the suffix).
        output_format: ``"jsonl"``, ``"csv"`` or ``"parquet"`` (the ``parquet``
            extra); default: from the output's suffix (``.csv``, ``.parquet``), else
            JSON lines. Not part of the fingerprint: the output is written from the
            checkpoint, in any format.
        id_field: the field that keys each record (default: a content hash).
        limit: process only the first *limit* records.
        on_error: ``"fail_fast"``, ``"collect"`` or ``"skip"`` (failed items left out of
            the output file; still in the store and the errors file).
        max_cost: the job's budget in USD, runs before this one included.
        retry_failed: send items that failed in an earlier run again.
        store: the checkpoint file (default: ``OUTPUT.llmbatch.sqlite``).
        errors: also write the error records to this JSONL file.
        max_concurrency: requests in flight at most (``None``: as the client's limits
            allow; see :mod:`llmbatch.concurrency`).
        mode: ``"online"``, ``"batch"`` (the provider's Batch API, half price) or
            ``"auto"`` (see :mod:`llmbatch.routing`). Not part of the fingerprint: both
            give the same answers. Batches in flight from an earlier run are always
            collected, whatever the mode, so nothing is paid twice; so are batches
            cancelled since (``llmbatch batch cancel``): the answers they finished
            before the cancel are kept, and only what they never ran is sent again.
        deadline: seconds within which the answers are needed (for ``"auto"``).
        prefer: ``"cost"`` or ``"speed"`` (for ``"auto"``).
        poll_interval: seconds before a batch's first status check (then backing off).
    """

    input: str | Path
    output: str | Path
    template: str = DEFAULT_TEMPLATE
    model: str
    provider: str = "openai"
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    json_mode: bool = False
    response_model: ResponseModel | None = None
    format: str | None = None
    output_format: str | None = None
    id_field: str | None = None
    limit: int | None = None
    on_error: OnError | str = OnError.COLLECT
    max_cost: float | None = None
    retry_failed: bool = False
    store: str | Path | None = None
    errors: str | Path | None = None
    max_concurrency: int | None = None
    mode: Mode = "online"
    deadline: float | None = None
    prefer: Prefer | None = None
    poll_interval: float = 15.0

    @property
    def store_path(self) -> Path:
        """Where the checkpoint lives."""
        if self.store is not None:
            return Path(self.store)
        out = Path(self.output)
        return out.with_name(out.name + ".llmbatch.sqlite")

    @property
    def schema(self) -> ResponseSchema[Any] | None:
        """The typed answer the job asks for (:attr:`response_model`), if any."""
        model = self.response_model
        return model if isinstance(model, ResponseSchema) else None

    def description(self) -> dict[str, Any]:
        """What makes the job's requests (and what ``llmbatch status`` shows)."""
        described: dict[str, Any] = {
            "provider": self.provider,
            "model": self.model,
            "template": self.template,
            "system": self.system,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "json": self.json_mode,
        }
        if self.schema is not None:  # only then: the jobs of earlier versions keep theirs
            described["schema"] = {"name": self.schema.name, "hash": self.schema.fingerprint}
        return described

    def fingerprint(self) -> str:
        """A hash of :meth:`description`: a changed prompt, model or parameter is
        another job, whose results must not be mixed with this one's."""
        return _sha256(self.description())

    def __post_init__(self) -> None:
        object.__setattr__(self, "on_error", OnError(str(self.on_error).replace("-", "_")))
        if self.response_model is not None:
            if self.json_mode:
                raise ValueError(
                    "json_mode and response_model exclude each other: a response model "
                    "already asks for JSON"
                )
            object.__setattr__(self, "response_model", ResponseSchema.of(self.response_model))
        output_format = self.output_format or detect_output_format(self.output)
        check_output_format(output_format)
        object.__setattr__(self, "output_format", output_format)
        if output_format != "jsonl":
            self.output_columns()  # a field that clashes with a column fails here

    def output_columns(self) -> dict[str, ColumnKind]:
        """The columns of a CSV or Parquet output, in order, with their kinds:
        ``key``, ``source``, ``status``; then one per top-level field of the response
        model (or ``answer``: the text, or the JSON object under *json_mode*);
        ``reasks`` (with a response model), ``error_type``, ``error_message``,
        ``input_tokens``, ``output_tokens``, ``cost``.

        Raises:
            ValueError: a field of the response model has the name of another column.
        """
        fields: dict[str, ColumnKind]
        if self.schema is None:
            fields = {"answer": "json" if self.json_mode else "string"}
        else:
            fields = field_kinds(self.schema.schema)
        after = dict(_COLUMNS_AFTER)
        if self.schema is None:
            del after["reasks"]
        for name in fields:
            if name in _COLUMNS_BEFORE or name in after:
                raise ValueError(
                    f"the response model's field {name!r} has the name of a column "
                    f"llmbatch writes in a {self.output_format} output ({name}): write "
                    'JSON lines instead (the answer under "parsed"), or rename the field'
                )
        return {**_COLUMNS_BEFORE, **fields, **after}

    def check_paths(self, others: Mapping[str, str | Path] | None = None) -> None:
        """Refuse paths that would make the job write over its own input.

        The output, the errors file, the checkpoint, their temporary files and *others*
        (more files the caller writes, by name: ``{"the JSON log": path}``) must each be
        another file than the input (compared as files: links, ``./`` and
        case-insensitive file systems included) and than each other, and none may lie
        inside a folder input. Checked before anything is written.

        Raises:
            ValueError: naming the two paths that clash.
        """
        written = {"the output": Path(self.output), "the checkpoint": self.store_path}
        written.update({name: Path(path) for name, path in (others or {}).items()})
        if self.errors is not None:
            written["the errors file"] = Path(self.errors)
        for name in ("the output", "the errors file"):
            if name in written:
                partial = written[name]
                written[f"{name}'s temporary file"] = partial.with_name(partial.name + ".partial")
        if self.input != "-":
            source = Path(self.input)
            for name, path in written.items():
                if _same_file(source, path):
                    raise ValueError(
                        f"{name} ({path}) is the input file ({source}): writing it would "
                        "destroy the input; choose another path"
                    )
                if source.is_dir() and _inside(path, source):
                    raise ValueError(
                        f"{name} ({path}) is inside the input folder ({source}): a rerun "
                        "would read it as input; write it elsewhere"
                    )
        names = list(written)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                if _same_file(written[first], written[second]):
                    raise ValueError(
                        f"{first} and {second} are the same file ({written[first]}): "
                        "choose different paths"
                    )

    def check_template(self, records: Iterable[Record], *, sample: int = 20) -> None:
        """Check the prompt template once, before any request, against the first
        *sample* readable records: a malformed template, or a field that none of them
        has, is one clear error instead of one error per record.

        A field that only some records lack stays those records' own error.

        Raises:
            ValueError: naming the field and the fields the records do have.
        """
        names = template_fields(self.template)
        seen: list[Record] = []
        for record in records:
            if record.error is None:
                seen.append(record)
                if len(seen) >= sample:
                    break
        if not seen:
            return
        available = sorted({str(name) for r in seen for name in r.fields})
        for name in names:
            if any(name in r.fields for r in seen):
                continue
            close = difflib.get_close_matches(name, available, n=1)
            hint = f"; did you mean {{{close[0]}}}?" if close else ""
            which = (
                "the first record does" if len(seen) == 1 else f"the first {len(seen)} records do"
            )
            raise ValueError(
                f"the prompt template uses the field {{{name}}}, which {which} not have "
                f"(fields: {', '.join(available) or 'none'}){hint}"
            )

    def records(
        self, stdin: TextIO | None = None, *, report_skipped: bool = True
    ) -> Iterator[Record]:
        """The job's input records (``-`` reads *stdin*, default ``sys.stdin``); a
        folder's skipped files are logged unless *report_skipped* is false."""
        return read_records(
            self.input,
            format=self.format,
            id_field=self.id_field,
            limit=self.limit,
            stdin=stdin,
            report_skipped=report_skipped,
        )


#: the columns of a table output around the answer's (see JobSpec.output_columns)
_COLUMNS_BEFORE: dict[str, ColumnKind] = {"key": "string", "source": "string", "status": "string"}
_COLUMNS_AFTER: dict[str, ColumnKind] = {
    "reasks": "integer",
    "error_type": "string",
    "error_message": "string",
    "input_tokens": "integer",
    "output_tokens": "integer",
    "cost": "number",
}


def _same_file(a: Path, b: Path) -> bool:
    """Whether *a* and *b* name one file: the same inode if both exist, else the same
    resolved path (compared case-insensitively where the file system is)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(a.resolve()) == os.path.normcase(b.resolve())


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Prepared:
    """A record made ready to send: its request and fingerprint, or why it cannot be;
    *collected*: its answer, already paid for, when only finishing it is left (see
    :attr:`~llmbatch.store.StoredItem.unfinished`)."""

    record: Record
    request: Request | None
    fingerprint: str | None
    error: str | None
    collected: Response | None = None


def prepare(spec: JobSpec, record: Record) -> Prepared:
    """The request for *record*, or the reason there is none (with the record's place)."""
    if record.error is not None:
        return Prepared(record, None, None, record.error)
    options: dict[str, Any] = {"model": spec.model, "key": record.key}
    if spec.max_tokens is not None:
        options["max_tokens"] = spec.max_tokens
    if spec.temperature is not None:
        options["temperature"] = spec.temperature
    if spec.json_mode:
        options["response_format"] = {"type": "json_object"}
    if spec.schema is not None:
        options["response_model"] = spec.schema
    try:
        request = build_request(spec.template, record.fields, system=spec.system, **options)
    except KeyError as exc:
        fields = ", ".join(sorted(map(str, record.fields))) or "none"
        message = (
            f"{record.source}: the prompt template needs the field {exc}, which this "
            f"record does not have (it has: {fields})"
        )
        return Prepared(record, None, None, message)
    except (ValueError, IndexError) as exc:
        return Prepared(record, None, None, f"{record.source}: {exc}")
    fingerprint = _sha256(
        {
            "job": spec.fingerprint(),
            "messages": request.messages,
            "max_tokens": request.max_tokens,
        }
    )
    return Prepared(record, request, fingerprint, None)


@dataclass(slots=True)
class JobProgress:
    """Live counters of a running job (what the progress display reads).

    Attributes:
        total: records in the input (``None`` when unknown, e.g. stdin).
        reused: records already answered in an earlier run (not sent).
        failed_earlier: records that failed in an earlier run and are not sent again
            (``retry_failed`` sends them).
        done: answered in this run.
        failed: failed in this run.
        invalid: records that could not become requests.
        sent: items handed to the client in this run.
        started: when the run started (``time.monotonic()``).
    """

    total: int | None = None
    reused: int = 0
    failed_earlier: int = 0
    done: int = 0
    failed: int = 0
    invalid: int = 0
    sent: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    _recent: deque[tuple[float, int]] = field(default_factory=deque)

    @property
    def finished(self) -> int:
        """Records accounted for so far, however they ended."""
        return self.reused + self.failed_earlier + self.done + self.failed + self.invalid

    @property
    def in_flight(self) -> int:
        """Items sent and not finished yet."""
        return self.sent - self.done - self.failed

    def completed(self, tokens: int, now: float | None = None) -> None:
        """Count one answered or failed call that used *tokens*."""
        now = time.monotonic() if now is None else now
        self.tokens += tokens
        self._recent.append((now, tokens))
        while self._recent and self._recent[0][0] < now - 60.0:
            self._recent.popleft()

    def rates(self, now: float | None = None) -> tuple[float, float]:
        """Calls and tokens per minute over the last minute (or since the start)."""
        now = time.monotonic() if now is None else now
        while self._recent and self._recent[0][0] < now - 60.0:
            self._recent.popleft()
        span = min(60.0, max(now - self.started, 1e-9))
        calls = len(self._recent)
        tokens = sum(t for _, t in self._recent)
        return calls * 60.0 / span, tokens * 60.0 / span

    def eta(self, now: float | None = None) -> float | None:
        """Seconds until every record is accounted for at the recent rate, if known."""
        if self.total is None:
            return None
        per_minute, _ = self.rates(now)
        remaining = max(0, self.total - self.finished)
        if remaining == 0:
            return 0.0
        return remaining * 60.0 / per_minute if per_minute > 0 else None


@dataclass(frozen=True, slots=True)
class JobReport:
    """How a run ended.

    Attributes:
        progress: the final counters.
        aborted: why the run stopped early (a fatal error, the budget, fail-fast),
            or ``None`` if it went through every record.
    """

    progress: JobProgress
    aborted: str | None = None


async def run_job(
    spec: JobSpec,
    client: LLMClient,
    *,
    store: Store | None = None,
    progress: JobProgress | None = None,
    fresh: bool = False,
    records: Iterable[Record] | None = None,
) -> JobReport:
    """Answer every record of *spec* not answered yet, recording each in the store.

    Args:
        spec: the job.
        client: the client to call (its limits and retry policy apply).
        store: the checkpoint (default: opened at ``spec.store_path`` and closed after).
        progress: counters to update as the run goes (for a display).
        fresh: discard what the store holds for this output first.
        records: the input records (default: read from ``spec.input``); pass them when
            the input cannot be read twice (stdin), and pass the same to
            :func:`write_output`.

    Returns:
        A :class:`JobReport`; item failures are in the store, not raised.

    Raises:
        ValueError: a path the job writes is its input (:meth:`JobSpec.check_paths`).
        JobMismatch: the store holds another job's results (and *fresh* is false).
        asyncio.CancelledError: the run was interrupted; everything finished is stored.
    """
    progress = progress if progress is not None else JobProgress()
    spec.check_paths()
    client.start_job()  # routes left and keys retired by an earlier job: tried again
    with contextlib.ExitStack() as stack:
        if store is None:
            store = stack.enter_context(Store(spec.store_path))
        store.begin(spec.fingerprint(), spec.description(), fresh=fresh)
        spent = store.summary().cost or 0.0
        if spec.max_cost is not None:
            left = spec.max_cost - spent
            client.max_cost = left if left > 1e-9 else 0.0  # float sums: a nano-dollar slack
        logger.info(
            "job.start",
            input=str(spec.input),
            store=str(store.path),
            already_done=store.summary().done,
            provider=spec.provider,
            model=spec.model,
        )
        in_flight: dict[int, Prepared] = {}
        stopped: list[str] = []  # why the input stopped being read early

        def to_send() -> Iterator[Prepared]:
            for chunk in _chunks(iter(records) if records is not None else spec.records(), 256):
                stored = store.get_many(r.key for r in chunk)
                for record in chunk:
                    ready = prepare(spec, record)
                    if ready.error is not None:
                        store.save_error(
                            record.key,
                            index=record.index,
                            source=record.source,
                            fingerprint=None,
                            error=ready.error,
                            invalid=True,
                        )
                        progress.invalid += 1
                        logger.warning("job.invalid_input", source=record.source, error=ready.error)
                        if spec.on_error == OnError.FAIL_FAST:
                            stopped.append(f"fail_fast: InvalidInput: {ready.error}")
                            return  # no new item starts; those in flight finish
                        continue
                    earlier = stored.get(record.key)
                    reuse = _reusable(earlier, ready, retry_failed=spec.retry_failed)
                    if reuse == "done":
                        progress.reused += 1
                        continue
                    if reuse == "failed":
                        progress.failed_earlier += 1
                        continue
                    if reuse == "finish":  # paid for by an earlier run: finish, not resend
                        assert earlier is not None
                        assert earlier.response is not None
                        ready = replace(ready, collected=response_from_record(earlier.response))
                    in_flight[progress.sent] = ready
                    progress.sent += 1
                    yield ready

        async def answer(ready: Prepared) -> Response:
            assert ready.request is not None
            if ready.collected is not None:
                answer = await client.finish(ready.request, ready.collected, batch=True)
                client.store(ready.request, answer)
                return answer
            return await client.complete(ready.request)

        aborted: str | None = None
        feed: Iterable[Prepared] = to_send()
        # items whose latest batch still runs, or was cancelled and not collected yet:
        # what it ran is paid for, so they must be answered from it, whatever the mode
        in_batches = uncollected_keys(store)
        if spec.mode != "online" or in_batches:
            pending = list(feed)
            if stopped:  # fail-fast on a bad record: submit nothing
                logger.error("job.aborted", reason=stopped[0])
                return JobReport(progress=progress, aborted=stopped[0])
            if _batch_route(spec, client, pending, in_batches):
                aborted = await _answer_in_batches(spec, client, store, progress, pending)
                aborted = aborted or (stopped[0] if stopped else None)
                return JobReport(progress=progress, aborted=aborted)
            feed = pending
        stream = stream_batch(
            answer,
            feed,
            max_concurrency=spec.max_concurrency or SAFETY_CAP,
            on_error=failure_strategy(spec.on_error),
            key=_prepared_key,
        )
        try:
            async with stream:
                async for outcome in stream:
                    ready = in_flight.pop(outcome.index)
                    _record(store, progress, ready, outcome.value)
                    _kill_point("item", progress.done + progress.failed)
        except BatchFailed as exc:
            aborted = f"{exc.reason}: {exc.error.error_type}: {exc.error.message}"
        aborted = aborted or (stopped[0] if stopped else None)
        if aborted is not None:
            logger.error("job.aborted", reason=aborted)
        return JobReport(progress=progress, aborted=aborted)


def _batch_route(
    spec: JobSpec, client: LLMClient, pending: list[Prepared], in_batches: set[str]
) -> bool:
    """Whether *pending* goes through the Batch API (see :mod:`llmbatch.routing`)."""
    if in_batches and any(p.record.key in in_batches for p in pending):
        logger.info(
            "job.resume_batches",
            detail="batches submitted by an earlier run are in flight or were cancelled: "
            "collecting them",
        )
        return True
    route = plan(
        spec.mode,
        [p.request for p in pending if p.request is not None],
        provider=client.provider,
        profile=client.profile(spec.model),
        default_max_tokens=spec.max_tokens,
        model=spec.model,
        deadline=spec.deadline,
        prefer=spec.prefer,
    )
    return route.mode == "batch"


async def _answer_in_batches(
    spec: JobSpec, client: LLMClient, store: Store, progress: JobProgress, pending: list[Prepared]
) -> str | None:
    """Answer *pending* through the Batch API, recording each item as its batch ends;
    why the job stopped early, if it did.

    An answer that needs finishing (a typed one is validated, and re-asked online when
    invalid; any under a finish policy) cannot be finished where the batch hands it
    over (``on_result`` is synchronous, and the batch is marked collected right after
    its results are handed over), nor only once every batch has ended (a crash in
    between would lose answers already paid for, their batches being collected). So
    it is stored at once, as collected but unfinished, then finished by a bounded
    stream that runs while later batches are still polled, and its finished form
    replaces it in the store. Either way each answer is recorded once: a crash before
    finishing leaves the unfinished record, which the next run finishes (see
    :attr:`~llmbatch.store.StoredItem.unfinished`) instead of sending the item again.
    """
    backend = batch_backend(client.provider)
    if backend is None:
        raise ValueError(f"the {client.provider.name} provider has no Batch API")
    # collected by an earlier run, which stopped before finishing them
    unfinished = [p for p in pending if p.collected is not None]
    pending = [p for p in pending if p.collected is None]
    # answered by an earlier job (the response cache): recorded, not submitted
    sending: list[Prepared] = []
    for ready in pending:
        hit = None if ready.request is None else await client.lookup(ready.request)
        if hit is None:
            sending.append(ready)
        else:
            _record(store, progress, ready, hit)
    pending = sending
    requests = [p.request for p in pending if p.request is not None]
    if client.max_cost is not None and requests:
        bound = client.profile(spec.model).cost(
            estimated_usage(requests, spec.max_tokens, model=spec.model), batch=True
        )
        if bound is not None and bound > client.max_cost:
            return (
                f"budget: the batch may cost up to ${bound:.4f} (max_tokens x requests), "
                f"more than the ${client.max_cost:.4f} left of --max-cost"
            )
    by_key = {p.record.key: p for p in pending}
    to_finish: asyncio.Queue[Prepared | None] = asyncio.Queue()
    for ready in unfinished:
        to_finish.put_nowait(ready)
    collected = 0

    def on_result(key: str, outcome: Response | Embedding | LLMBatchError) -> None:
        nonlocal collected
        ready = by_key[key]
        assert ready.request is not None
        value: Response | ItemError
        if isinstance(outcome, Response):
            if ready.request.schema is not None or client.finish_policy is not None:
                to_finish.put_nowait(_save_collected(store, client, ready, outcome))
                collected += 1
                _kill_point("collected", collected)
                return
            value = client.account(ready.request, outcome, batch=True)
            client.store(ready.request, value)
        elif isinstance(outcome, Embedding):  # a chat job never gets one
            raise TypeError("an embedding came back for a chat request")
        else:
            value = ItemError.from_exception(ready.record.index, outcome, key=key)
        _record(store, progress, ready, value)
        _kill_point("item", progress.done + progress.failed)

    async def batches() -> str | None:
        try:
            if pending:
                await run_batch_api(
                    backend,
                    [(p.record.key, p.request) for p in pending if p.request is not None],
                    journal=store,
                    on_result=on_result,
                    poll_interval=spec.poll_interval,
                    max_poll_interval=max(spec.poll_interval, 300.0),
                    # the store holds what collected batches answered; what is passed
                    # again (a failed item to retry, a changed record) is to be answered
                    # anew. Batches not collected yet (running, or cancelled: what they
                    # ran before the cancel is paid for) are collected all the same,
                    # and their answers stored once: a key the store holds as answered
                    # is not passed again.
                    reuse_collected=False,
                )
        except FatalError as exc:
            return f"fatal: {type(exc).__name__}: {exc}"
        finally:
            to_finish.put_nowait(None)  # nothing more to finish
        return None

    submitted = asyncio.ensure_future(batches())
    aborted = await _finish_collected(spec, client, store, progress, to_finish, submitted)
    await asyncio.wait([submitted])
    if aborted is None and not submitted.cancelled():
        aborted = submitted.result()
    return aborted


def _save_collected(
    store: Store, client: LLMClient, ready: Prepared, response: Response
) -> Prepared:
    """Store a Batch API answer that still needs finishing, priced at the batch
    discount (it is paid for); *ready* with it, to be finished."""
    assert ready.request is not None
    assert ready.fingerprint is not None
    model = ready.request.model or response.model or ""
    cost = client.profile(model).cost(response.usage, batch=True)
    collected = replace(response, cost=cost, key=response.key or ready.record.key)
    store.save_response(
        ready.record.key,
        index=ready.record.index,
        source=ready.record.source,
        fingerprint=ready.fingerprint,
        response=collected,
        finished=False,
    )
    return replace(ready, collected=collected)


async def _finish_collected(
    spec: JobSpec,
    client: LLMClient,
    store: Store,
    progress: JobProgress,
    to_finish: asyncio.Queue[Prepared | None],
    submitted: asyncio.Future[str | None],
) -> str | None:
    """Finish the collected answers *to_finish* brings (until its ``None``), at most
    ``max_concurrency`` at once (re-asks go online, through the limiter), recording
    each; why it stopped early (a fatal error: *submitted* is then cancelled; its
    batches keep running at the provider, and the next run collects them)."""
    started: dict[int, Prepared] = {}  # by their place in the feed, until recorded

    async def feed() -> AsyncIterator[Prepared]:
        index = 0
        while (ready := await to_finish.get()) is not None:
            started[index] = ready
            index += 1
            yield ready

    async def finish(ready: Prepared) -> Response:
        assert ready.request is not None
        assert ready.collected is not None
        # the batch's part is charged at the discount, the follow-ups at the online price
        # (an answer an earlier run collected is charged again in this client's
        # statistics and budget, never in the store: its finished record replaces it)
        answer = await client.finish(ready.request, ready.collected, batch=True)
        client.store(ready.request, answer)
        return answer

    stream = stream_batch(
        finish,
        feed(),
        max_concurrency=spec.max_concurrency or SAFETY_CAP,
        # as for the batch's own results: an item's error is its own; a fatal one stops
        on_error=OnError.COLLECT,
        key=_prepared_key,
    )
    try:
        async with stream:
            async for outcome in stream:
                _record(store, progress, started.pop(outcome.index), outcome.value)
                _kill_point("item", progress.done + progress.failed)
    except BatchFailed as exc:
        submitted.cancel()
        return f"{exc.reason}: {exc.error.error_type}: {exc.error.message}"
    except BaseException:
        submitted.cancel()
        raise
    return None


def _prepared_key(ready: Prepared) -> str:
    return ready.record.key


def _reusable(stored: StoredItem | None, ready: Prepared, *, retry_failed: bool) -> str | None:
    """How *stored* already settles *ready*, so that it is not sent again: ``"done"``
    (answered), ``"finish"`` (answered and paid for, to be finished), ``"failed"``
    (failed earlier, and failures are not retried), or ``None`` (send it)."""
    if stored is None or stored.status == "invalid":
        return None
    if stored.fingerprint != ready.fingerprint:
        logger.warning(
            "job.item_changed",
            key=ready.record.key,
            source=ready.record.source,
            detail="the record changed since it was answered: answering it again",
        )
        return None
    if stored.status == "done":
        return "finish" if stored.unfinished else "done"
    return None if retry_failed else "failed"


def _record(
    store: Store, progress: JobProgress, ready: Prepared, value: Response | ItemError
) -> None:
    record = ready.record
    assert ready.fingerprint is not None
    if isinstance(value, ItemError):
        if value.cancelled or (value.exception is not None and is_fatal(value.exception)):
            # Cut short by an abort, or stopped by a fatal error that is the job's (a
            # refused key, no quota, the budget), not the item's: still pending.
            return
        store.save_error(
            record.key,
            index=record.index,
            source=record.source,
            fingerprint=ready.fingerprint,
            error=replace(value, message=f"{record.source}: {value.message}"),
        )
        progress.failed += 1
        progress.completed(0)
        return
    store.save_response(
        record.key,
        index=record.index,
        source=record.source,
        fingerprint=ready.fingerprint,
        response=value,
    )
    progress.done += 1
    progress.completed(value.usage.total_tokens)


def _chunks(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- the output file -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputCounts:
    """What :func:`write_output` wrote, by status."""

    ok: int = 0
    failed: int = 0
    pending: int = 0
    skipped: int = 0

    @property
    def total(self) -> int:
        """Input records covered."""
        return self.ok + self.failed + self.pending + self.skipped


def write_output(
    spec: JobSpec, *, store: Store | None = None, records: Iterable[Record] | None = None
) -> OutputCounts:
    """Write the output file (and the errors file) from the store, in input order.

    One line per input record: ``{"key", "source", "status": "ok", "answer", ...}``
    (a typed answer: ``"parsed"`` and ``"reasks"`` instead of ``"answer"``),
    ``{"status": "error", "error": {"type", "message", "attempts"}}`` (an answer that
    stayed invalid: also its ``"raw"`` text, its ``"errors"`` and ``"reasks"``), or
    ``{"status": "pending"}`` for a record the run did not finish. A CSV or Parquet
    output has a row per record instead (:meth:`JobSpec.output_columns`); the errors
    file is JSON lines either way. Under ``on_error="skip"`` failed records are left out
    of the output (the errors file has them). Each file is written to ``NAME.partial``
    and renamed over ``NAME``, so it is always whole.

    Args:
        spec: the job.
        store: the checkpoint (default: opened at ``spec.store_path``).
        records: the input records (default: read from ``spec.input`` again).
    """
    skip = spec.on_error == OnError.SKIP
    ok = failed = pending = skipped = 0
    spec.check_paths()
    with contextlib.ExitStack() as stack:
        if store is None:
            store = stack.enter_context(Store(spec.store_path))
        write = _line_writer(spec, stack)
        errors = stack.enter_context(AtomicFile(Path(spec.errors))) if spec.errors else None
        records = iter(records) if records is not None else spec.records(report_skipped=False)
        _kill_point("output", 0)
        for chunk in _chunks(records, 500):
            stored = store.get_many(r.key for r in chunk)
            for record in chunk:
                line = _output_line(spec, record, stored.get(record.key))
                status = line["status"]
                if status == "ok":
                    ok += 1
                elif status == "pending":
                    pending += 1
                else:
                    if errors is not None:
                        errors.write(json.dumps(line, ensure_ascii=False) + "\n")
                    if skip:
                        skipped += 1
                        continue
                    failed += 1
                write(line)
                _kill_point("output", ok + failed + pending)
        _kill_point("rename", 0)
    return OutputCounts(ok=ok, failed=failed, pending=pending, skipped=skipped)


def _line_writer(spec: JobSpec, stack: contextlib.ExitStack) -> Any:
    """A function writing one output line to the output file, in *spec*'s format."""
    path = Path(spec.output)
    if spec.output_format == "jsonl":
        out = stack.enter_context(AtomicFile(path))

        def write_json(line: dict[str, Any]) -> None:
            out.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")

        return write_json
    columns = spec.output_columns()
    table = stack.enter_context(TableWriter(path, str(spec.output_format), columns))

    def write_row(line: dict[str, Any]) -> None:
        table.write(_table_row(spec, line))

    return write_row


def _table_row(spec: JobSpec, line: Mapping[str, Any]) -> dict[str, Any]:
    """An output line as a table row (see :meth:`JobSpec.output_columns`)."""
    row: dict[str, Any] = {"key": line["key"], "source": line["source"], "status": line["status"]}
    if line["status"] == "ok":
        if spec.schema is not None:
            parsed = line.get("parsed")
            row.update(parsed if isinstance(parsed, Mapping) else {})
            row["reasks"] = line.get("reasks", 0)
        else:
            row["answer"] = line.get("answer")
        usage = line.get("usage") or {}
        row["input_tokens"] = usage.get("input_tokens")
        row["output_tokens"] = usage.get("output_tokens")
        row["cost"] = line.get("cost")
    elif line["status"] == "error":
        error = line.get("error") or {}
        row["error_type"] = error.get("type")
        row["error_message"] = error.get("message")
        if spec.schema is not None and "reasks" in error:
            row["reasks"] = error["reasks"]
    return row


def _output_line(spec: JobSpec, record: Record, stored: StoredItem | None) -> dict[str, Any]:
    line: dict[str, Any] = {"key": record.key, "source": record.source}
    ready = prepare(spec, record)
    if ready.error is not None:
        line["status"] = "error"
        line["error"] = error_record(ready.error)
        return line
    if (
        stored is None
        or stored.fingerprint != ready.fingerprint
        or stored.status == "invalid"
        or stored.unfinished  # collected, not validated yet: the next run finishes it
    ):
        line["status"] = "pending"
        return line
    if stored.status == "failed":
        line["status"] = "error"
        line["error"] = stored.error
        return line
    response = dict(stored.response or {})
    line["status"] = "ok"
    parsed = response.pop("parsed", None)
    text = response.pop("text", "")
    refusal = response.pop("refusal", None)
    reasks = response.pop("reasks", 0)
    if spec.schema is not None:
        line["parsed"] = parsed
        line["reasks"] = reasks
    else:
        line["answer"] = parsed if spec.json_mode and parsed is not None else text
    if refusal is not None:  # a refusal kept by the finish policy
        line["refusal"] = refusal
    response.pop("request_id", None)
    response.pop("latency", None)
    line.update(response)
    return line


def _kill_point(name: str, count: int) -> None:
    """Fault injection for the crash tests: with ``LLMBATCH_TEST_KILL_AT=item:5`` the
    process SIGKILLs itself once 5 items are recorded (``output:N``: after N output
    lines; ``rename:0``: just before the output file replaces the old one)."""
    target = os.environ.get("LLMBATCH_TEST_KILL_AT")
    if target is not None and target == f"{name}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


# -- the estimate ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a job would send and cost (``llmbatch estimate``, ``--dry-run``).

    Attributes:
        records: input records.
        invalid: records that cannot become requests.
        already_done: records the checkpoint already answers (not sent again).
        to_send: requests the job would send.
        input_tokens: their prompts' tokens (:func:`~llmbatch.routing.estimated_usage`),
            the response model's schema included.
        max_output_tokens: their output at most (``max_tokens`` x requests).
        cost_online: USD at most online (``None``: prices unknown).
        cost_batch: USD at most through the Batch API.
        minutes_at_limits: the least time the limits allow, in minutes.
        binding_limit: the limit that sets that time.
        encoding: the tokenizer counted with (and whether it is exact for the model).
        schema_tokens: the tokens the response model's schema adds to every request
            (0 without one): it is sent with each.
        from_cache: records the response cache already answers (not sent, not in
            the tokens, cost or time; ``None``: the cache was not looked at).
        duplicates: records identical to an earlier record's request (sent once).
        saved_cost: what the cached answers cost when they were paid for.
    """

    records: int
    invalid: int
    already_done: int
    to_send: int
    input_tokens: int
    max_output_tokens: int
    cost_online: float | None
    cost_batch: float | None
    minutes_at_limits: float | None
    binding_limit: str | None
    encoding: str
    schema_tokens: int = 0
    from_cache: int | None = None
    duplicates: int = 0
    saved_cost: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serializable form."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class Coverage:
    """The records of a job that would not be sent (:func:`cache_coverage`).

    Attributes:
        cached: keys of the records the response cache answers.
        duplicates: keys of the records whose request an earlier record already asks
            (the job sends it once and gives every record its answer).
        saved_cost: what the cached answers cost when they were paid for (USD).
    """

    cached: frozenset[str] = frozenset()
    duplicates: frozenset[str] = frozenset()
    saved_cost: float = 0.0

    def __contains__(self, key: object) -> bool:
        return key in self.cached or key in self.duplicates


def _done_keys(spec: JobSpec) -> set[str]:
    """The records the job's checkpoint already answers (for this very job)."""
    if not spec.store_path.exists():
        return set()
    with Store(spec.store_path) as store:
        if store.fingerprint() != spec.fingerprint():
            return set()
        return {item.key for item in store.items("done")}


async def cache_coverage(spec: JobSpec, client: LLMClient, *, chunk: int = 64) -> Coverage:
    """Which of *spec*'s records still to answer would not be sent by *client*: found
    in its response cache, or duplicates of an earlier record's request. Sends nothing
    (``llmbatch estimate``); a cache that cannot be used covers nothing.

    Args:
        spec: the job.
        client: the client the job would use (its cache, policy and dedupe decide).
        chunk: cache lookups in flight at once.
    """
    done = _done_keys(spec)
    seen: set[str] = set()
    duplicates: set[str] = set()
    cached: set[str] = set()
    batch: list[tuple[str, Request]] = []

    async def look(pending: list[tuple[str, Request]]) -> None:
        answers = await asyncio.gather(*(client.lookup(request) for _, request in pending))
        for (key, _), answer in zip(pending, answers, strict=True):
            if answer is not None:
                cached.add(key)

    before = client.statistics().saved_cost
    for record in spec.records():
        if record.key in done:
            continue
        request = prepare(spec, record).request
        if request is None:
            continue
        key = client.request_key(request)
        if key is None:
            continue
        if key in seen:
            duplicates.add(record.key)
            continue
        seen.add(key)
        if client.cache is not None and client.cache_policy.reads:
            batch.append((record.key, request))
            if len(batch) >= chunk:
                await look(batch)
                batch = []
    if batch:
        await look(batch)
    saved = client.statistics().saved_cost - before
    return Coverage(cached=frozenset(cached), duplicates=frozenset(duplicates), saved_cost=saved)


def estimate_job(
    spec: JobSpec,
    limits: Limits,
    *,
    profile: ModelProfile | None = None,
    samples: int = 0,
    coverage: Coverage | None = None,
) -> tuple[Estimate, list[Request]]:
    """Count a job's records, tokens, cost and time at *limits*, calling nothing.

    Args:
        spec: the job (its checkpoint, if any, says what is already done).
        limits: the limits the run would pace at.
        profile: the model's prices (default: ``spec.provider``/``spec.model``'s profile).
        samples: how many of the first requests to return, to show them.
        coverage: the records the cache answers or that repeat another record's
            request (:func:`cache_coverage`): left out of what is sent.
    """
    from llmbatch.tokens import TokenCounter, admission_estimate

    counter = TokenCounter.for_model(spec.model)
    done = _done_keys(spec)
    covered = coverage if coverage is not None else Coverage()
    records = invalid = already = 0
    admitted = 0
    requests: list[Request] = []
    usage = Usage()
    schema_tokens = _schema_tokens(spec, counter)
    for record in spec.records():
        records += 1
        ready = prepare(spec, record)
        if ready.request is None:
            invalid += 1
            continue
        if record.key in done:
            already += 1
            continue
        if record.key in covered:
            continue
        if len(requests) < samples:
            requests.append(ready.request)
        # the one estimate (with the schema's tokens, when there is one)
        usage = usage + estimated_usage([ready.request], spec.max_tokens, model=spec.model)
        admitted += admission_estimate(ready.request.messages, spec.model) + schema_tokens
    not_sent = len(covered.cached) + len(covered.duplicates)
    to_send = records - invalid - already - not_sent
    max_out = usage.output_tokens
    if profile is None:
        profile = profile_for(spec.provider, spec.model)
    minutes: dict[str, float] = {}
    if limits.rpm:
        minutes["rpm"] = to_send / limits.rpm
    if limits.tpm:
        minutes["tpm"] = (admitted + max_out) / limits.tpm
    if limits.input_tpm:
        minutes["input_tpm"] = admitted / limits.input_tpm
    if limits.output_tpm:
        minutes["output_tpm"] = max_out / limits.output_tpm
    binding = max(minutes, key=lambda k: minutes[k]) if minutes else None
    estimate = Estimate(
        records=records,
        invalid=invalid,
        already_done=already,
        to_send=to_send,
        input_tokens=usage.input_tokens,
        max_output_tokens=max_out,
        cost_online=profile.cost(usage),
        cost_batch=profile.cost(usage, batch=True),
        minutes_at_limits=round(minutes[binding], 2) if binding else None,
        binding_limit=binding,
        encoding=counter.encoding + ("" if counter.exact else " (approximate)"),
        schema_tokens=schema_tokens,
        from_cache=len(covered.cached) if coverage is not None else None,
        duplicates=len(covered.duplicates),
        saved_cost=covered.saved_cost if coverage is not None else None,
    )
    return estimate, requests


def _schema_tokens(spec: JobSpec, counter: Any) -> int:
    """The tokens of what carries the response model's schema in every request: a
    forced tool for Anthropic, ``response_format`` (the strict rewrite) otherwise."""
    schema = spec.schema
    if schema is None:
        return 0
    sent: Any
    if spec.provider == "anthropic":
        sent = {"tools": [schema.anthropic_tool()], "tool_choice": schema.anthropic_tool_choice()}
    else:
        sent = schema.openai_response_format()
    count: int = counter.count(json.dumps(sent, separators=(",", ":")))
    return count
