"""``llmbatch estimate``: records, tokens, cost and time, calling nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from llmbatch._log import get_logger
from llmbatch.cache import CachePolicy, ResponseCache
from llmbatch.cli._common import (
    INPUT,
    cache_of,
    cache_options,
    check_input,
    choose,
    configure_logging,
    describe_limits,
    job_spec,
    limits_for,
    money,
    request_options,
    schema_of,
    seconds_text,
    template_of,
)
from llmbatch.client import LLMClient
from llmbatch.config import (
    load_profiles,
    profile_for,
)
from llmbatch.job import Coverage, JobSpec, cache_coverage, estimate_job
from llmbatch.limits import Limits
from llmbatch.providers import ProviderChoice

__all__ = ["estimate"]

logger = get_logger("llmbatch.cli")


def _coverage(
    spec: JobSpec, choice: ProviderChoice, cache: ResponseCache | None, policy: CachePolicy
) -> Coverage | str:
    """What the cache and the job's dedupe leave unsent, or why it is not known."""
    try:
        # called for nothing: it names the server keyed (no key needed for that)
        provider = choice.open(api_key="unused-by-estimate")
    except ValueError as exc:
        if cache is not None:
            asyncio.run(cache.aclose())
        return f"not looked up: {exc}"

    async def look() -> Coverage:
        try:
            async with LLMClient(
                provider,
                model=spec.model,
                max_tokens=spec.max_tokens,
                cache=cache,
                cache_policy=policy,
                dedupe=True,  # as `llmbatch run`
            ) as client:
                return await cache_coverage(spec, client)
        finally:
            if cache is not None:
                await cache.aclose()

    return asyncio.run(look())


def _print_estimate(
    spec: JobSpec,
    choice: ProviderChoice,
    limits: Limits,
    *,
    samples: int = 0,
    as_json: bool = False,
    cache: ResponseCache | None = None,
    cache_policy: CachePolicy | None = None,
) -> None:
    profile = profile_for(choice.name, spec.model, profiles=load_profiles())
    covered = _coverage(spec, choice, cache, cache_policy or CachePolicy())
    coverage = covered if isinstance(covered, Coverage) else None
    estimate, shown = estimate_job(
        spec, limits, profile=profile, samples=samples, coverage=coverage
    )
    if as_json:
        fields = estimate.as_dict()
        if coverage is None:
            fields["cache"] = covered
        click.echo(json.dumps(fields))
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
    if coverage is None:
        table.add_row("not sent", f"the cache was {covered}")
    else:
        where = cache.where if cache is not None else "off"
        found = f"{estimate.from_cache} answered by the cache ({where}"
        found += f", {money(estimate.saved_cost)} when paid)" if estimate.from_cache else ")"
        table.add_row("not sent", f"{found}, {estimate.duplicates} duplicates of another record")
    counted = estimate.encoding
    if estimate.schema_tokens:
        counted += f"; the schema adds {estimate.schema_tokens} to each request"
    table.add_row("input tokens", f"{estimate.input_tokens} ({counted})")
    table.add_row("output tokens", f"at most {estimate.max_output_tokens} (max_tokens x records)")
    table.add_row("cost online", f"at most {money(estimate.cost_online)}")
    table.add_row("cost batch API", f"at most {money(estimate.cost_batch)}")
    minutes = estimate.minutes_at_limits
    at_limits = "unknown (no limits)"
    if minutes is not None:
        at_limits = f"{seconds_text(minutes * 60)} ({estimate.binding_limit} binds"
        at_limits += f"; limits: {describe_limits(limits)})"
    table.add_row("time at the limits", at_limits)
    console.print(table)
    for request in shown:
        console.rule("first request" if request is shown[0] else "next request")
        for message in request.messages:
            console.print(f"{message['role']}: {message['content']}", markup=False, highlight=False)


@click.command()
@INPUT
@request_options
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The run's output (to count what its checkpoint already holds).",
)
@cache_options
@click.option("--as-json", is_flag=True, help="Print the estimate as one JSON object.")
def estimate(**options: Any) -> None:
    """Count records, tokens, cost (online and batch) and time for INPUT, calling nothing
    (the response cache is looked up: what it answers is not counted as sent)."""
    configure_logging(verbose=0, quiet=True, log_json=None)
    schema = schema_of(options["schema"], json_mode=options["json_mode"])
    choice = choose(options["provider"], options["model"], calls=False)
    spec = job_spec(
        input=options["input"],
        output=options["output"] or Path("-"),
        template=template_of(options["template"], options["prompt_file"]),
        model=choice.model,
        provider=choice.name,
        system=options["system"],
        max_tokens=options["max_tokens"],
        temperature=options["temperature"],
        json_mode=options["json_mode"],
        response_model=schema,
        format=options["input_format"],
        id_field=options["id_field"],
        limit=options["limit"],
    )
    check_input(spec)
    limits = limits_for(choice, options["rpm"], options["tpm"], options["concurrency"])
    cache, cache_policy = cache_of(options)
    _print_estimate(
        spec, choice, limits, as_json=options["as_json"], cache=cache, cache_policy=cache_policy
    )
