"""``llmbatch.map`` end to end: 2,000 items against the simulator with RPM and TPM limits
and 10% injected 500s, compared with the least possible time.

    python benchmarks/map.py [--items 2000]

The simulator runs in its own process (~1 s latency, ±10%). Reported: wall time, least
possible time (buckets start full; the expected extra attempts for the 500s counted;
the larger of the RPM and TPM bounds), efficiency = least / wall, items ok / error
records / lost / wrong (an answer whose content tag is not its item's), 429s, server
requests and duplicate answers the server counted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

import structlog
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))

from limits import server_stats, simulator

import llmbatch
from llmbatch.limits import Limits
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.testing._content import content_tag, estimate_tokens
from llmbatch.tokens import openai_admission_estimate

RPM, TPM, MAX_TOKENS, LATENCY, ERRORS = 1200, 300_000, 128, 1.0, 0.1
TEMPLATE = "Summarize item {i}: a short paragraph about pacing requests to a provider's limits."


async def run(root: str, items: int) -> tuple[float, llmbatch.BatchResult[llmbatch.Response]]:
    docs = [{"i": i} for i in range(items)]
    openai_admission_estimate([{"role": "user", "content": "warm up"}])
    async with OpenAIProvider(base_url=f"{root}/v1", api_key="sk-bench") as provider:
        start = time.perf_counter()
        result = await llmbatch.map(
            TEMPLATE,
            docs,
            model="gpt-4o-mini",
            provider=provider,
            max_tokens=MAX_TOKENS,
            limits=Limits(rpm=RPM, tpm=TPM),
            max_concurrency=256,
        )
        return time.perf_counter() - start, result


def least_possible(items: int) -> float:
    attempts = items / (1 - ERRORS)
    per_request = (
        estimate_tokens({"messages": [{"role": "user", "content": TEMPLATE.format(i=1000)}]})
        + MAX_TOKENS
    )
    by_rpm = max(0.0, attempts - RPM) / (RPM / 60)
    by_tpm = max(0.0, attempts * per_request - TPM) / (TPM / 60)
    return LATENCY + max(by_rpm, by_tpm)


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    args = parser.parse_args()
    scenario = {"rpm": RPM, "tpm": TPM, "errors": {500: ERRORS}}
    with simulator(scenario) as root:
        seconds, result = asyncio.run(run(root, args.items))
        stats = server_stats(root)
    wrong = sum(
        1
        for i, r in enumerate(result.results)
        if isinstance(r, llmbatch.Response)
        and not r.text.startswith(f"[{content_tag(TEMPLATE.format(i=i))}]")
    )
    least = least_possible(args.items)
    table = Table(title=f"llmbatch.map: {args.items:,} items, RPM {RPM}, TPM {TPM:,}, 10% 500s")
    for column in (
        "wall s",
        "least s",
        "efficiency",
        "ok",
        "errors",
        "lost",
        "wrong",
        "429s",
        "server requests",
        "duplicates",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        f"{seconds:.1f}",
        f"{least:.1f}",
        f"{least / seconds:.3f}",
        str(result.succeeded),
        str(result.failed),
        str(args.items - len(result)),
        str(wrong),
        str(sum(stats.get("rate_limited", {}).values())),
        str(stats.get("requests")),
        str(stats.get("duplicates")),
    )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
