"""``llmbatch status`` and ``llmbatch batch list|cancel``: what a run's checkpoint holds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from llmbatch._log import get_logger
from llmbatch.cli._common import (
    choose,
    configure_logging,
    money,
    open_provider,
    store_path,
)
from llmbatch.store import Store

__all__ = ["batch", "status"]

logger = get_logger("llmbatch.cli")


_TARGET = click.argument("target", type=click.Path(dir_okay=False, path_type=Path))


@click.command()
@_TARGET
@click.option("--errors", "show_errors", is_flag=True, help="List the failed records.")
@click.option("--as-json", is_flag=True, help="Print the status as one JSON object.")
def status(target: Path, show_errors: bool, as_json: bool) -> None:
    """Show what a run's checkpoint holds. TARGET is the run's output file (which need
    not exist yet: a run killed early has only its checkpoint) or the checkpoint."""
    path = store_path(target)
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
    table.add_row("cost", money(summary.cost))
    in_flight = report["batches"]["submitted"]  # type: ignore[index]
    table.add_row("batches", f"{len(batches)} ({in_flight} in flight)")
    console.print(table)
    for error in errors:
        console.print(
            f"{error['source']}: {error.get('type')}: {error.get('message')}",
            markup=False,
            highlight=False,
        )


@click.group()
def batch() -> None:
    """The Batch API batches a run submitted."""


@batch.command("list")
@_TARGET
def batch_list(target: Path) -> None:
    """List the batches in a run's checkpoint (TARGET: the output file or checkpoint)."""
    with Store(store_path(target)) as store:
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
    path = store_path(target)
    choice = choose(provider, None)

    async def cancel() -> list[str]:
        opened = open_provider(choice)
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
