"""``llmbatch limits``: the limits a provider reports for the key."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

import click
from rich.console import Console
from rich.table import Table

from llmbatch._log import get_logger
from llmbatch.cli._common import (
    choose,
    configure_logging,
    describe_limits,
    open_provider,
)
from llmbatch.config import (
    load_profiles,
    profile_for,
)
from llmbatch.errors import LLMBatchError
from llmbatch.limits import RateLimitHeaders
from llmbatch.models import Request
from llmbatch.providers import ProviderChoice

__all__ = ["limits"]

logger = get_logger("llmbatch.cli")


@click.command()
@click.option("--provider", help="openai, anthropic, or an OpenAI-compatible base URL.")
@click.option("--model", help="The model to ask about.")
@click.option("--as-json", is_flag=True, help="Print the limits as one JSON object.")
def limits(provider: str | None, model: str | None, as_json: bool) -> None:
    """Print the rate limits the provider reports in its headers (one 1-token call)."""
    configure_logging(verbose=0, quiet=True, log_json=None)
    choice = choose(provider, model)
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
        "profile": describe_limits(profile.limits),
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
    provider = open_provider(choice)
    try:
        response = await provider.complete(
            Request.from_prompt("Say OK.", model=choice.model, max_tokens=1)
        )
    except LLMBatchError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        await provider.aclose()
    return response.headers
