"""Typed outputs at scale: N documents, a 4-field schema, against the simulator with a
share of its answers broken, through ``llmbatch.map(..., response_model=...)``.

    python benchmarks/structured.py [--docs 1000] [--invalid 0.10]

Two runs over the same documents in one process, the simulator (in this process, ~50 ms
latency, no rate limit) answering strict ``json_schema`` requests:

* ``clean``: every answer valid (the cost of the job with no re-ask);
* ``X% invalid``: half of the broken answers unparseable JSON, half valid JSON that
  breaks the schema (``SimulatorConfig.invalid_json`` / ``schema_violations``).

Reported: typed rows, items lost (no row and no error), items failed, the invalid replies
the simulator sent (its own count), the re-asks the client made (their ratio must stay
<= 1.1), and the extra cost those re-asks added over the clean run.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Literal

from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

import llmbatch
from llmbatch.failure import ItemError
from llmbatch.models import Response
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.testing import Simulator


class Reading(BaseModel):
    """What a document is about."""

    summary: str = Field(description="one sentence")
    topics: list[str] = Field(min_length=1)
    sentiment: Literal["pos", "neg", "neutral"]
    confidence: Literal["low", "medium", "high"]


async def run(docs: list[dict[str, str]], invalid: float) -> dict[str, float]:
    broken = {"invalid_json": invalid / 2, "schema_violations": invalid / 2}
    async with Simulator(ttft=0.05, seed=3, **broken) as sim:
        async with OpenAIProvider(base_url=sim.base_url, api_key="sk-bench") as provider:
            result = await llmbatch.map(
                "Read and classify: {text}",
                docs,
                model="gpt-4o-mini",
                provider=provider,
                response_model=Reading,
                max_reasks=2,
                max_tokens=200,
                limits=llmbatch.Limits(rpm=1_000_000, tpm=10**10),
            )
        stats = sim.stats()
    rows = [r for r in result.results if isinstance(r, Response)]
    failed = [r for r in result.results if isinstance(r, ItemError)]
    return {
        "typed": sum(isinstance(r.parsed, Reading) for r in rows),
        "lost": len(docs) - len(rows) - len(failed),
        "failed": len(failed),
        "invalid replies": stats.structured["invalid_json"] + stats.structured["schema_violations"],
        "re-asks": sum(r.reasks for r in rows),
        "requests": stats.requests,
        "cost": sum(r.cost or 0.0 for r in rows),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--invalid", type=float, default=0.10)
    args = parser.parse_args()
    docs = [
        {"text": f"document {i}: a paragraph about topic {i % 23} and its consequences"}
        for i in range(args.docs)
    ]
    clean = await run(docs, 0.0)
    broken = await run(docs, args.invalid)
    table = Table(title=f"{args.docs:,} documents, a 4-field schema, llmbatch.map")
    columns = ["run", "typed rows", "lost", "failed", "invalid replies", "re-asks"]
    columns += ["re-asks / invalid", "requests", "cost $", "extra cost"]
    for column in columns:
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, row in (("clean", clean), (f"{args.invalid:.0%} invalid", broken)):
        ratio = row["re-asks"] / row["invalid replies"] if row["invalid replies"] else 0.0
        extra = row["cost"] / clean["cost"] - 1 if clean["cost"] else 0.0
        table.add_row(
            name,
            f"{row['typed']:,.0f}",
            f"{row['lost']:.0f}",
            f"{row['failed']:.0f}",
            f"{row['invalid replies']:,.0f}",
            f"{row['re-asks']:,.0f}",
            f"{ratio:.2f}",
            f"{row['requests']:,.0f}",
            f"{row['cost']:.4f}",
            f"{extra:+.1%}",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    asyncio.run(main())
