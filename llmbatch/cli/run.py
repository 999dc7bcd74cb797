"""``llmbatch run``: answer one prompt per record, resumably, with a live view (and,
with ``--metrics-port``, the figures for Prometheus: :mod:`llmbatch.metrics`)."""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from llmbatch._log import get_logger
from llmbatch.batchapi import StoredBatch, uncollected_keys
from llmbatch.cache import CachePolicy, ResponseCache
from llmbatch.cli._common import (
    EXIT_ABORTED,
    EXIT_FAILED_ITEMS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    INPUT,
    cache_of,
    cache_options,
    check_input,
    choose,
    configure_logging,
    describe_concurrency,
    describe_limits,
    job_spec,
    limit_text,
    limits_for,
    money,
    open_provider,
    request_options,
    schema_of,
    seconds_text,
    template_of,
)
from llmbatch.cli.estimate import _print_estimate
from llmbatch.client import DEFAULT_MAX_REASKS, USE_DEFAULT, LLMClient
from llmbatch.config import (
    LimiterSettings,
    config_file,
    limiter_settings,
)
from llmbatch.errors import LimiterUnavailable, LLMBatchError, redact
from llmbatch.io import OUTPUT_FORMATS, count_records
from llmbatch.job import JobProgress, JobSpec, run_job, write_output
from llmbatch.limits import Limits
from llmbatch.metrics import MetricsServer, serve_prometheus
from llmbatch.providers import ProviderChoice, open_fallback
from llmbatch.providers.pool import Fallback, KeyPool
from llmbatch.store import JobMismatch, Store
from llmbatch.structured import FinishPolicy

__all__ = ["run"]

logger = get_logger("llmbatch.cli")


@click.command()
@INPUT
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The file to write, one line (or row) per input record: JSON lines, or CSV or "
    "Parquet by its suffix (.csv, .parquet) or --output-format.",
)
@request_options
@click.option(
    "--output-format",
    type=click.Choice(OUTPUT_FORMATS),
    help="jsonl, csv or parquet (the parquet extra); default: from OUTPUT's suffix, else "
    "jsonl. CSV and Parquet get a column per field of the --schema.",
)
@click.option(
    "--max-reasks",
    type=click.IntRange(min=0),
    default=DEFAULT_MAX_REASKS,
    show_default=True,
    help="With --schema: follow-up requests an invalid answer may get (each quoting what "
    "is wrong); then the record fails as InvalidOutput, with the raw answer.",
)
@click.option(
    "--on-truncated",
    type=click.Choice(["error", "keep", "retry-larger"]),
    help="An answer cut off at --max-tokens: fail the record, keep it, or ask once more "
    "with twice the max-tokens (default: error with --schema, else keep).",
)
@click.option(
    "--on-refusal",
    type=click.Choice(["error", "keep"]),
    help="An answer the model refused or a content filter stopped: fail the record or "
    "keep it (default: error with --schema, else keep).",
)
@click.option(
    "--on-error",
    type=click.Choice(["fail-fast", "collect", "skip"]),
    default="collect",
    show_default=True,
    help="What a failed record does to the run.",
)
@click.option(
    "--max-cost", type=click.FloatRange(min=0.0), help="Stop once the job has spent this many USD."
)
@click.option(
    "--mode",
    type=click.Choice(["online", "batch", "auto"]),
    default="online",
    show_default=True,
    help="online, the provider's Batch API (half price, within 24 h), or auto.",
)
@click.option(
    "--prefer",
    type=click.Choice(["cost", "speed"]),
    help="For --mode auto: take the Batch API for cost, or stay online for speed.",
)
@click.option(
    "--deadline",
    type=click.FloatRange(min=0.0),
    help="For --mode auto: hours within which the answers are needed.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.01),
    default=15.0,
    show_default=True,
    help="Seconds before a batch's first status check (then backing off).",
)
@cache_options
@click.option(
    "--fallback",
    "fallbacks",
    multiple=True,
    metavar="MODEL|PROVIDER/MODEL",
    help="Another model for the records the first cannot answer (unavailable after its "
    "retries, context too long, content filtered), and for the whole job if the first is "
    "refused or unreachable; repeat for a chain. PROVIDER/MODEL uses another provider "
    "(its key from the environment).",
)
@click.option(
    "--limiter-url",
    metavar="URL",
    help="Share each quota with every process using it: redis://host:port/db "
    "(default: $LLMBATCH_LIMITER_URL, [limiter] url, else this process only).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.0, min_open=True),
    help="Seconds one attempt may wait for the provider's answer before it is retried "
    "(default: the model profile's timeout in llmbatch.toml, else 120).",
)
@click.option(
    "--retry-failed", is_flag=True, help="Send records that failed in an earlier run again."
)
@click.option("--fresh", is_flag=True, help="Discard the checkpoint and start over.")
@click.option(
    "--store",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The checkpoint file (default: OUTPUT.llmbatch.sqlite).",
)
@click.option(
    "--errors",
    "errors_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the error records to this file.",
)
@click.option(
    "--dry-run", is_flag=True, help="Show what would be sent and what it would cost; call nothing."
)
@click.option(
    "--log-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also append the log as JSON lines to this file.",
)
@click.option(
    "--progress-interval",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds between progress lines when stderr is not a terminal.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    metavar="PORT",
    help="Serve the run's figures for Prometheus at http://127.0.0.1:PORT/metrics while it "
    "runs (needs the metrics extra).",
)
@click.option("-v", "--verbose", count=True, help="Log more (debug events).")
@click.option("-q", "--quiet", is_flag=True, help="Log only warnings and errors.")
def run(**options: Any) -> None:
    """Answer one prompt per record of INPUT and write OUTPUT.

    INPUT is a JSONL, CSV or Parquet file, a folder of text files (one document
    each: fields text, name, path) or - for JSON lines on stdin. Every record ends as
    one line of OUTPUT, in input order: its answer, or its error. Finished records are
    checkpointed as they finish: rerun the same command after a crash or Ctrl-C and
    only the rest is sent.
    """
    configure_logging(verbose=options["verbose"], quiet=options["quiet"], log_json=None)
    schema = schema_of(options["schema"], json_mode=options["json_mode"])
    choice = choose(options["provider"], options["model"])
    spec = job_spec(
        input=options["input"],
        output=options["output"],
        template=template_of(options["template"], options["prompt_file"]),
        model=choice.model,
        provider=choice.name,
        system=options["system"],
        max_tokens=options["max_tokens"],
        temperature=options["temperature"],
        json_mode=options["json_mode"],
        response_model=schema,
        format=options["input_format"],
        output_format=options["output_format"],
        id_field=options["id_field"],
        limit=options["limit"],
        on_error=options["on_error"],
        max_cost=options["max_cost"],
        retry_failed=options["retry_failed"],
        store=options["store"],
        errors=options["errors_path"],
        mode=options["mode"],
        prefer=options["prefer"],
        deadline=options["deadline"] * 3600 if options["deadline"] is not None else None,
        poll_interval=options["poll_interval"],
    )
    log_json: Path | None = options["log_json"]
    check_input(spec)
    _check_writable(spec, {"the JSON log": log_json} if log_json is not None else {})
    if log_json is not None:
        # opened only now: a path that is the input must not be appended to first
        log_file = log_json.open("a", encoding="utf-8")
        atexit.register(log_file.close)
        configure_logging(verbose=options["verbose"], quiet=options["quiet"], log_json=log_file)
    limits = limits_for(choice, options["rpm"], options["tpm"], options["concurrency"])
    try:
        quotas = limiter_settings(url=options["limiter_url"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--limiter-url") from None
    cache, cache_policy = cache_of(options)
    try:
        # (a URL provider is "openai" by name: its fallback to openai/... is OpenAI's)
        fallbacks = [open_fallback(value, choice.kind) for value in options["fallbacks"]]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fallback") from None
    if options["dry_run"]:
        _print_estimate(spec, choice, limits, samples=2, cache=cache, cache_policy=cache_policy)
        return
    metrics: MetricsServer | None = None
    if options["metrics_port"] is not None:
        try:
            metrics = serve_prometheus(options["metrics_port"])
        except (ImportError, OSError) as exc:
            raise click.BadParameter(str(exc), param_hint="--metrics-port") from None
    if choice.note:
        logger.warning("provider.default", detail=choice.note)
    code = asyncio.run(
        _run(
            spec,
            choice,
            limits,
            fresh=options["fresh"],
            interval=options["progress_interval"],
            quotas=quotas,
            attempt_timeout=options["timeout"],
            max_reasks=options["max_reasks"],
            finish_policy=finish_policy(
                options["on_truncated"], options["on_refusal"], typed=schema is not None
            ),
            cache=cache,
            cache_policy=cache_policy,
            metrics=metrics,
            fallbacks=fallbacks,
        )
    )
    sys.exit(code)


def finish_policy(
    on_truncated: str | None, on_refusal: str | None, *, typed: bool
) -> FinishPolicy | None:
    """The finish policy of ``--on-truncated``/``--on-refusal`` (``None``: neither given,
    the client's default: error for typed answers, keep for text)."""
    if on_truncated is None and on_refusal is None:
        return None
    policy = FinishPolicy()  # error: a cut or refused object is never valid
    if not typed:
        policy = FinishPolicy(length="keep", content_filter="keep", refusal="keep")
    # (the values are click.Choice's; FinishPolicy checks them again)
    changes: dict[str, Any] = {}
    if on_truncated is not None:
        changes["length"] = on_truncated.replace("-", "_")
    if on_refusal is not None:
        changes["content_filter"] = changes["refusal"] = on_refusal
    return replace(policy, **changes)


def _check_writable(spec: JobSpec, others: Mapping[str, Path]) -> None:
    """Nothing the run writes may replace its input (exit 2 before anything is written)."""
    try:
        spec.check_paths(others)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


async def _run(
    spec: JobSpec,
    choice: ProviderChoice,
    limits: Limits,
    *,
    fresh: bool,
    interval: float,
    quotas: LimiterSettings,
    attempt_timeout: float | None = None,
    max_reasks: int = DEFAULT_MAX_REASKS,
    finish_policy: FinishPolicy | None = None,
    cache: ResponseCache | None = None,
    cache_policy: CachePolicy | None = None,
    metrics: MetricsServer | None = None,
    fallbacks: Sequence[Fallback] = (),
) -> int:
    console = Console(stderr=True)
    records = list(spec.records()) if spec.input == "-" else None  # stdin is read once
    if records is not None:
        try:
            spec.check_template(records)
        except ValueError as exc:
            console.print(f"[red]error:[/] {exc}")
            return EXIT_ABORTED
    progress = JobProgress(total=len(records) if records is not None else _count(spec))
    spec = _replace(spec, max_concurrency=limits.max_concurrency)
    try:
        store = Store(spec.store_path)
    except LLMBatchError as exc:
        console.print(f"[red]error:[/] {exc}")
        return EXIT_ABORTED
    provider = open_provider(choice)
    client = LLMClient(
        provider,
        model=spec.model,
        max_tokens=spec.max_tokens,
        limits=limits,
        limiter_url=quotas,
        timeout=USE_DEFAULT if attempt_timeout is None else attempt_timeout,
        max_concurrency=limits.max_concurrency,
        max_reasks=max_reasks,
        finish_policy=finish_policy,
        cache=cache,
        cache_policy=cache_policy,
        dedupe=True,  # one job: identical records are sent once
        fallbacks=fallbacks,
    )
    if metrics is not None:
        metrics.add(client)  # served until the process ends
    try:
        # A shared quota that cannot be used stops the run before any request.
        await client.check_limiter(spec.model)
    except LimiterUnavailable as exc:
        console.print(f"[red]error:[/] {exc}")
        await client.aclose()
        if cache is not None:
            await cache.aclose()
        store.close()
        return EXIT_ABORTED
    config = config_file()
    logger.info(
        "run.config",
        profile=f"{choice.name}/{spec.model}",
        config=str(config) if config is not None else "built-in profiles",
        provider=choice.name,
        base_url=choice.base_url,
        model=spec.model,
        limits=describe_limits(limits),
        quotas=quotas.describe(),
        concurrency=describe_concurrency(client),
        timeout=client.timeout,
        records=progress.total,
        store=str(spec.store_path),
        schema=spec.schema.name if spec.schema is not None else None,
        cache=cache.where if cache is not None else "off",
        keys=len(provider.members) if isinstance(provider, KeyPool) else 1,
        fallbacks=[f"{(f.provider or provider).name}/{f.model}" for f in fallbacks] or None,
        metrics=metrics.url if metrics is not None else None,
    )
    job = asyncio.ensure_future(
        run_job(spec, client, store=store, progress=progress, fresh=fresh, records=records)
    )
    stopped_by: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        if stopped_by:  # a second Ctrl-C: leave now; the store is already safe
            os._exit(EXIT_INTERRUPTED[signum])
        stopped_by.append(signum)
        logger.warning(
            "run.interrupted",
            signal=signum.name,
            detail="keeping what finished; rerun the same command to continue",
        )
        job.cancel()

    loop = asyncio.get_running_loop()
    for signum in EXIT_INTERRUPTED:
        loop.add_signal_handler(signum, on_signal, signum)
    started = time.monotonic()
    aborted: str | None = None
    try:
        with _progress_display(console, progress, client, spec.model, interval):
            try:
                report = await job
                aborted = report.aborted
            except asyncio.CancelledError:
                if not stopped_by:
                    raise
            except JobMismatch as exc:
                console.print(f"[red]error:[/] {exc}")
                return EXIT_ABORTED
    finally:
        for signum in EXIT_INTERRUPTED:
            loop.remove_signal_handler(signum)
        try:
            await client.aclose()
        finally:
            if cache is not None:
                await cache.aclose()  # the client leaves a cache it was given open
        try:
            counts = write_output(spec, store=store, records=records)
        finally:
            summary = store.summary()
            # Batches still running, and cancelled ones whose finished part (already
            # paid) is still to collect: a rerun picks both up.
            pending = uncollected_keys(store)
            in_flight = [
                b
                for b in store.batches("submitted", "cancelled")
                if set(b.items.values()) & pending
            ]
            store.close()
    _print_summary(
        console,
        spec,
        progress,
        counts,
        summary,
        client,
        time.monotonic() - started,
        aborted,
        stopped_by,
        in_flight,
    )
    if stopped_by:
        return EXIT_INTERRUPTED[stopped_by[0]]
    if aborted is not None:
        return EXIT_ABORTED
    return EXIT_FAILED_ITEMS if counts.failed or counts.skipped or counts.pending else EXIT_OK


def _replace(spec: JobSpec, **changes: Any) -> JobSpec:
    return replace(spec, **changes)


def _count(spec: JobSpec) -> int | None:
    n = count_records(spec.input, format=spec.format)
    if n is not None and spec.limit is not None:
        n = min(n, spec.limit)
    return n


@contextmanager
def _progress_display(
    console: Console, progress: JobProgress, client: Any, model: str, interval: float
) -> Iterator[None]:
    """A live display on a terminal; a log line every *interval* seconds otherwise.
    Either way the numbers are read on the event loop (the client and its limiter
    belong to it), by a task that lives as long as the ``with`` block."""
    if console.is_terminal:
        from rich.live import Live

        live = Live(console=console, auto_refresh=False, transient=True)

        async def redraw() -> None:
            while True:
                live.update(_live_view(progress, client, model), refresh=True)
                await asyncio.sleep(0.25)

        with live:
            task = asyncio.ensure_future(redraw())
            try:
                yield
            finally:
                task.cancel()
        return
    task = asyncio.ensure_future(_log_progress(progress, client, model, interval))
    try:
        yield
    finally:
        task.cancel()


def _snapshot(progress: JobProgress, client: Any, model: str) -> dict[str, Any]:
    per_minute, tokens_per_minute = progress.rates()
    stats = client.statistics()
    limiter = client.quota_statistics(model)
    eta = progress.eta()
    return {
        "finished": progress.finished,
        "total": progress.total,
        "done": progress.done + progress.reused,
        "failed": progress.failed + progress.invalid,
        "in_flight": progress.in_flight,
        "in_flight_target": stats.in_flight_target.limit if stats.in_flight_target else None,
        "in_flight_reason": stats.in_flight_target.reason if stats.in_flight_target else None,
        # attempts beyond one per item sent: re-asks are follow-ups, counted apart, and
        # answers from the cache or a duplicate record took no attempt
        "retries": max(
            0,
            stats.attempts
            - stats.reasks
            - (progress.done - stats.cache_hits - stats.duplicates)
            - progress.failed
            - progress.in_flight,
        ),
        "cache_hits": stats.cache_hits,
        "duplicates": stats.duplicates,
        "saved_cost": stats.saved_cost,
        "reasks": stats.reasks,
        "invalid": stats.invalid,
        "rpm": round(per_minute, 1),
        "tpm": round(tokens_per_minute),
        "rpm_limit": limiter.limits.get("rpm"),
        "tpm_limit": limiter.limits.get("tpm"),
        "rate_limited": limiter.rate_limited,
        # what other spenders of the same key are seen to take (another process)
        "others_rpm": round(limiter.others.get("rpm", 0.0), 1),
        "cost": stats.cost,
        "eta_seconds": round(eta, 1) if eta is not None else None,
    }


def _live_view(progress: JobProgress, client: Any, model: str) -> Table:
    s = _snapshot(progress, client, model)
    table = Table.grid(padding=(0, 2))
    total = s["total"] if s["total"] is not None else "?"
    eta = seconds_text(s["eta_seconds"])
    table.add_row(
        f"[bold]{s['finished']}/{total}[/] records",
        f"[green]{s['done']} ok[/]",
        f"[red]{s['failed']} failed[/]",
        f"{s['in_flight']} in flight (target {s['in_flight_target']})",
        f"{s['retries']} retries" + (f", {s['reasks']} re-asks" if s["reasks"] else ""),
        f"ETA {eta}",
    )
    table.add_row(
        f"{s['rpm']:.0f}/{limit_text(s['rpm_limit'])} req/min",
        f"{s['tpm']}/{limit_text(s['tpm_limit'])} tok/min",
        f"{s['rate_limited']} 429s",
        f"spent {money(s['cost'])}",
        f"others on this key: {s['others_rpm']:.0f} req/min" if s["others_rpm"] else "",
        "",
    )
    if s["cache_hits"] or s["duplicates"]:
        table.add_row(
            f"[cyan]{s['cache_hits']} from the cache[/]",
            f"[cyan]{s['duplicates']} duplicates[/]",
            f"saved {money(s['saved_cost'])}",
            "",
            "",
            "",
        )
    table.add_row(f"[dim]in-flight target: {s['in_flight_reason']}[/]", "", "", "", "", "")
    return table


async def _log_progress(progress: JobProgress, client: Any, model: str, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        logger.info("run.progress", **_snapshot(progress, client, model))


def _print_summary(
    console: Console,
    spec: JobSpec,
    progress: JobProgress,
    counts: Any,
    summary: Any,
    client: Any,
    seconds: float,
    aborted: str | None,
    stopped_by: list[signal.Signals],
    in_flight: list[StoredBatch],
) -> None:
    table = Table(title="llmbatch run", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("records", str(counts.total))
    table.add_row("ok", f"{counts.ok} ({progress.done} answered now, {progress.reused} earlier)")
    failed_now = progress.failed + progress.invalid
    failed = f"{counts.failed + counts.skipped} ({failed_now} now"
    if progress.failed_earlier:
        failed += f", {progress.failed_earlier} earlier: rerun with --retry-failed to send them"
    failed += ")" + (" (left out: --on-error skip)" if counts.skipped else "")
    table.add_row("failed", failed)
    table.add_row("pending", str(counts.pending))
    stats = client.statistics()
    table.add_row(
        "this run",
        f"{progress.sent} records started, {stats.requests} requests sent, {seconds_text(seconds)}",
    )
    if stats.cache_hits or stats.duplicates:
        table.add_row(
            "not sent",
            f"{stats.cache_hits} answers from the cache, {stats.duplicates} duplicates of "
            f"another record; {money(stats.saved_cost)} saved",
        )
    if spec.schema is not None or stats.reasks:
        table.add_row(
            "re-asks",
            f"{stats.reasks} this run; {stats.invalid} answers still invalid after "
            f"--max-reasks (InvalidOutput)",
        )
    table.add_row("tokens (job)", f"{summary.input_tokens} in, {summary.output_tokens} out")
    table.add_row("cost (job)", money(summary.cost))
    table.add_row("output", str(spec.output) + (f"; errors: {spec.errors}" if spec.errors else ""))
    table.add_row("checkpoint", str(spec.store_path))
    console.print(table)
    if aborted:
        console.print(f"[red]aborted:[/] {redact(aborted)}")
    if stopped_by:
        console.print(
            f"[yellow]interrupted[/]: rerun the same command to continue ({counts.pending} pending)"
        )
    elif counts.pending and not aborted:
        console.print(f"{counts.pending} records pending: rerun to continue")
    if in_flight:
        console.print(
            f"{len(in_flight)} batches keep running at the provider: rerun the same command "
            "to collect them (nothing is submitted twice), or stop them with "
            f"`llmbatch batch cancel {spec.output}`"
        )
