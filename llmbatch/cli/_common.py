"""What the commands share: logging set-up, options, formatting, provider choice."""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import IO, Any

import click
import structlog

from llmbatch.cache import CachePolicy, ResponseCache, cache_settings
from llmbatch.client import LLMClient
from llmbatch.config import (
    load_profiles,
    profile_for,
)
from llmbatch.errors import redact
from llmbatch.io import FORMATS
from llmbatch.job import DEFAULT_TEMPLATE, JobSpec
from llmbatch.limits import Limits
from llmbatch.providers import ProviderChoice, choose_provider
from llmbatch.providers.base import Provider
from llmbatch.structured import ResponseSchema

__all__ = ["configure_logging", "redact_secrets"]

EXIT_OK, EXIT_FAILED_ITEMS, EXIT_ABORTED = 0, 1, 2
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


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


def choose(provider: str | None, model: str | None, *, calls: bool = True) -> ProviderChoice:
    """:func:`llmbatch.providers.choose_provider`, its errors as usage errors."""
    try:
        return choose_provider(provider, model, calls=calls)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--provider") from None


def open_provider(choice: ProviderChoice) -> Provider:
    """:meth:`ProviderChoice.open`, its errors (a missing key) as usage errors."""
    try:
        return choice.open()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def limits_for(
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


def describe_concurrency(client: LLMClient) -> str:
    """The in-flight target in force and why (adaptive unless --concurrency)."""
    target = client.statistics().in_flight_target
    if target is None:
        return "?"
    if client.max_concurrency is not None:
        return target.reason
    return f"follows the limits and the latency, starting at {target.limit} ({target.reason})"


def describe_limits(limits: Limits) -> str:
    shown = [
        f"{name}={value}"
        for name in ("rpm", "tpm", "input_tpm", "output_tpm", "max_concurrency")
        if (value := getattr(limits, name)) is not None
    ]
    if limits.learn:
        shown.append("learned from headers")
    return ", ".join(shown) or "none"


INPUT = click.argument("input", type=click.Path(allow_dash=True, path_type=str))


def request_options(f: Any) -> Any:
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
            "--provider",
            help="openai, anthropic, gemini, azure, local, or an OpenAI-compatible base URL.",
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
            "--schema",
            metavar="FILE|MODULE:MODEL",
            help="A typed answer for every record: a JSON Schema file, or a pydantic model "
            "imported as package.module:Model (from the current folder too). Answers are "
            'validated (invalid ones re-asked) and written under "parsed". Excludes --json.',
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


def cache_options(f: Any) -> Any:
    """``--cache``, ``--cache-mode`` and ``--cache-ttl`` (defaults: the ``[cache]``
    table of ``llmbatch.toml``, then a SQLite file in the user cache folder)."""
    options = [
        click.option(
            "--cache",
            "cache_spec",
            metavar="PATH|URL|off",
            help="The response cache across jobs: answers found there are not paid again. "
            "'default' is a SQLite file in the user cache folder; or a path, a "
            "redis://host/db URL shared by many processes, or 'off' (default: "
            "$LLMBATCH_CACHE, [cache] location, else 'default').",
        ),
        click.option(
            "--cache-mode",
            type=click.Choice(["read-write", "read-only", "refresh"]),
            help="read-only: serve hits, store nothing; refresh: ask again and store the "
            "new answers (default: [cache] mode, else read-write).",
        ),
        click.option(
            "--cache-ttl",
            type=click.FloatRange(min=0.0, min_open=True),
            metavar="HOURS",
            help="Serve cached answers only this many hours old at most (default: "
            "[cache] ttl_hours, else any age).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def cache_of(options: Mapping[str, Any]) -> tuple[ResponseCache | None, CachePolicy]:
    """The cache and policy of the ``cache_options``, over the configured ones."""
    try:
        settings = cache_settings()
        cache = settings.open(options["cache_spec"])
    except (ValueError, TypeError, ImportError) as exc:
        raise click.BadParameter(str(exc), param_hint="--cache") from None
    policy = settings.policy()
    if options["cache_mode"] is not None:
        policy = policy.copy(mode=options["cache_mode"])
    if options["cache_ttl"] is not None:
        policy = policy.copy(ttl=options["cache_ttl"] * 3600.0)
    return cache, policy


def job_spec(**fields: Any) -> JobSpec:
    """:class:`~llmbatch.job.JobSpec` from the options, its errors (an output format
    without its extra, a field that clashes with an output column) as usage errors."""
    try:
        return JobSpec(**fields)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def schema_of(value: str | None, *, json_mode: bool = False) -> ResponseSchema[Any] | None:
    """The ``--schema`` option's response model, loaded before anything is sent: a
    JSON Schema file, or ``package.module:Model`` imported with the current folder on
    ``sys.path`` (as uvicorn imports an app). Anything wrong is a usage error (exit 2)."""
    if value is None:
        return None
    if json_mode:
        raise click.UsageError(
            "--schema and --json exclude each other: a schema already asks for JSON (drop --json)"
        )
    path = Path(value)
    if path.is_file() or ":" not in value:
        return _schema_file(path)
    return _schema_import(value)


def _bad_schema(message: str) -> click.BadParameter:
    return click.BadParameter(message, param_hint="--schema")


def _schema_file(path: Path) -> ResponseSchema[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _bad_schema(
            f"{path} does not exist (give a JSON Schema file, or package.module:Model)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad_schema(f"{path} cannot be read: {exc}") from None
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise _bad_schema(f"{path} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise _bad_schema(f"{path} holds a JSON {type(schema).__name__}, not a JSON Schema object")
    return _response_schema(schema, str(path))


def _schema_import(reference: str) -> ResponseSchema[Any]:
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise _bad_schema(f"{reference!r} is not package.module:Model")
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise _bad_schema(
                f"cannot import {module_name!r}: no such module (looked in {here} and "
                "the installed packages)"
            ) from None
        raise _bad_schema(f"importing {module_name!r} failed: {exc}") from None
    except Exception as exc:
        raise _bad_schema(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    found: Any = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise _bad_schema(f"{module_name!r} has no attribute {attribute!r}") from None
    return _response_schema(found, reference)


def _response_schema(model: Any, where: str) -> ResponseSchema[Any]:
    try:
        return ResponseSchema.of(model)
    except (TypeError, ValueError, ImportError) as exc:
        raise _bad_schema(f"{where}: {exc}") from None


def template_of(template: str | None, prompt_file: IO[str] | None) -> str:
    if template is not None and prompt_file is not None:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        return prompt_file.read()
    return template or DEFAULT_TEMPLATE


def limit_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def seconds_text(value: float | None) -> str:
    if value is None:
        return "?"
    minutes, seconds = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def money(value: float | None) -> str:
    return "?" if value is None else f"${value:.4f}"


def store_path(target: Path) -> Path:
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


def check_input(spec: JobSpec) -> None:
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
