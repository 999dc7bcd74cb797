"""``serve-sim``: run the provider simulator from the command line.

The command is a plain click command, so the ``llmbatch`` CLI group can attach it
(``llmbatch serve-sim``); until then ``python -m llmbatch.testing`` runs it. The first
line on stdout is the OpenAI base URL (``http://127.0.0.1:PORT/v1``), so a script can
start it with ``--port 0`` and read where it listens; it serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from typing import Any

import click

from llmbatch.testing.simulator import BatchSimConfig, Simulator, SimulatorConfig

__all__ = ["serve_sim"]


def _status_fractions(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[int, float]:
    """Parse repeated ``STATUS=FRACTION`` options (``--error 500=0.01 --error 529=0.02``)."""
    errors: dict[int, float] = {}
    for value in values:
        status, sep, fraction = value.partition("=")
        try:
            if not sep:
                raise ValueError(value)
            errors[int(status)] = float(fraction)
        except ValueError:
            raise click.BadParameter(f"expected STATUS=FRACTION, got {value!r}") from None
    return errors


@click.command("serve-sim")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=int, default=0, show_default=True, help="0 picks a free port.")
@click.option("--rpm", type=int, help="Requests per minute per (key, model).")
@click.option("--tpm", type=int, help="OpenAI tokens per minute per (key, model).")
@click.option("--rpd", type=int, help="OpenAI requests per day.")
@click.option("--tpd", type=int, help="OpenAI tokens per day.")
@click.option("--itpm", type=int, help="Anthropic input tokens per minute.")
@click.option("--otpm", type=int, help="Anthropic output tokens per minute.")
@click.option(
    "--bucket-seconds",
    type=float,
    help="Enforce per-minute limits over buckets holding this many seconds' worth "
    "(OpenAI's quantized limits; e.g. 6: RPM 10000 bursts 1000).",
)
@click.option(
    "--otpm-reservation",
    type=click.Choice(["max_tokens", "actual"]),
    default="max_tokens",
    show_default=True,
    help="Reserve max_tokens against OTPM at admission, or charge the actual output after.",
)
@click.option(
    "--charge-rejected",
    type=click.Choice(["request", "full", "none"]),
    default="request",
    show_default=True,
    help="What a request rejected with 429 still costs.",
)
@click.option("--context-window", type=int, default=128_000, show_default=True)
@click.option("--api-key", "api_keys", multiple=True, help="Accept only these keys (repeatable).")
@click.option("--insufficient-quota", is_flag=True, help="Every key is out of quota.")
@click.option("--ttft", type=float, default=0.0, show_default=True, help="Seconds to first token.")
@click.option("--tokens-per-second", type=float, help="Output speed (default: instantaneous).")
@click.option("--jitter", type=float, default=0.0, show_default=True, help="Latency jitter, 0..1.")
@click.option("--max-in-flight", type=int, help="Requests served at once; the rest queue.")
@click.option(
    "--error",
    "errors",
    multiple=True,
    metavar="STATUS=FRACTION",
    callback=_status_fractions,
    help="Answer this fraction of requests with STATUS (repeatable).",
)
@click.option("--hang", type=float, default=0.0, show_default=True, help="Fraction that hang.")
@click.option("--hang-seconds", type=float, default=3600.0, show_default=True)
@click.option("--reset", type=float, default=0.0, show_default=True, help="Fraction reset.")
@click.option("--malformed", type=float, default=0.0, show_default=True, help="Fraction garbled.")
@click.option(
    "--invalid-json",
    type=float,
    default=0.0,
    show_default=True,
    help="Fraction of JSON answers (response_format, forced tools) sent as broken JSON.",
)
@click.option(
    "--schema-violations",
    type=float,
    default=0.0,
    show_default=True,
    help="Fraction of JSON answers sent as valid JSON that breaks the schema.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds faults and jitter.")
@click.option("--batch/--no-batch", default=True, show_default=True, help="Serve the Batch APIs.")
@click.option(
    "--batch-seconds-per-request",
    type=float,
    default=BatchSimConfig().seconds_per_request,
    show_default=True,
    help="Simulated batch processing time per request.",
)
def serve_sim(
    *, batch: bool, batch_seconds_per_request: float, api_keys: tuple[str, ...], **options: Any
) -> None:
    """Run the OpenAI/Anthropic provider simulator until interrupted."""
    try:
        config = SimulatorConfig(
            api_keys=api_keys or None,
            batch=BatchSimConfig(seconds_per_request=batch_seconds_per_request) if batch else None,
            **options,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    asyncio.run(_serve(config))


async def _serve(config: SimulatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with Simulator(config) as sim:
        _collect_less_often()
        click.echo(sim.base_url)
        click.echo(f"serving {config!r}; Ctrl-C stops", err=True)
        await stop.wait()


def _collect_less_often() -> None:
    """Tune the garbage collector for a process that only serves.

    Every open connection keeps objects alive (its protocol, transport, handler task),
    and each request allocates a few hundred more. At the default thresholds the
    collector runs every 700 allocations and keeps re-scanning the older generations:
    with 2,000 connections open that was about a quarter of the server's CPU. What
    start-up allocated is frozen out of the collector's sight, and the young generation
    takes 50,000 allocations before a pass: the cycles left in between amount to a few
    megabytes.
    """
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)
