"""Anthropic prompt caching: what automatic ``cache_control`` saves on a real-sized job.

    python benchmarks/prompt_cache.py [--items 1000] [--instruction 2000] [--itpm N]

One job of ``--items`` documents (~150 tokens each) sharing a ``--instruction``-token
system prompt, through ``llmbatch.map`` against the simulator (in this process; ~0.2 s
latency), once with ``AnthropicProvider(prompt_caching="auto")`` (the default) and once
with ``"off"``. Each run gets a fresh simulator, so the first request writes the prefix.

The cost is computed from the simulator's own usage figures (what Anthropic would bill:
uncached input, cache writes at 1.25x, cache reads at 0.1x, output) at the model's
built-in prices, next to the cost llmbatch reported (the sum of ``Response.cost``, which
prices cache writes as plain input until ``Usage`` reports them). "ITPM" is the input
that counts toward Anthropic's input-tokens-per-minute limit: cache reads do not.

The simulator is the optimistic case: a prefix is readable as soon as the request that
writes it is admitted. On the real API, requests sent before the first answer has begun
each write it too (at most one concurrency wave's worth of writes).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Literal

import structlog
from rich.console import Console
from rich.table import Table

import llmbatch
from llmbatch.config import BUILTIN_PROFILES
from llmbatch.limits import Limits
from llmbatch.providers.anthropic import AnthropicProvider, min_cacheable_tokens
from llmbatch.testing import Simulator, SimulatorStats

MODEL = "claude-sonnet-4-5"
MAX_TOKENS = 64
LATENCY = 0.2
RULES = (
    "You review documents for an archive. For each document, name its subject, say in "
    "one sentence what it claims, and flag anything that contradicts the archive rules "
    "below. Answer in plain English, never invent facts, and keep to two sentences. "
)
WORDS = [
    "ledger",
    "harbour",
    "survey",
    "census",
    "charter",
    "tariff",
    "treaty",
    "almanac",
    "register",
    "inventory",
]


def instruction(tokens: int) -> str:
    """A shared instruction of about *tokens* tokens (four characters a token)."""
    return (RULES * (4 * tokens // len(RULES) + 1))[: 4 * tokens]


def document(i: int) -> dict[str, str]:
    """Document *i*: ~150 tokens of its own."""
    words = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(90))
    return {"text": f"Document {i}: {words}."}


@dataclass(frozen=True, slots=True)
class Run:
    mode: str
    seconds: float
    ok: int
    stats: SimulatorStats
    reported_cost: float


async def run(
    mode: Literal["auto", "off"], items: int, system: str, itpm: int | None, model: str
) -> Run:
    docs = [document(i) for i in range(items)]
    async with (
        Simulator(ttft=LATENCY, itpm=itpm, rpm=None) as sim,
        AnthropicProvider(base_url=sim.url, api_key="sk-ant-bench", prompt_caching=mode) as p,
    ):
        start = time.perf_counter()
        result = await llmbatch.map(
            "Review this document:\n\n{text}",
            docs,
            model=model,
            provider=p,
            system=system,
            max_tokens=MAX_TOKENS,
            limits=Limits(input_tpm=itpm) if itpm else Limits(),
            max_concurrency=256,
        )
        seconds = time.perf_counter() - start
        stats = sim.stats()
    reported = sum(r.cost or 0.0 for r in result.ok)
    return Run(mode, seconds, len(result.ok), stats, reported)


def billed(stats: SimulatorStats, model: str) -> float:
    """What the simulator's usage figures cost at the model's list prices."""
    profile = BUILTIN_PROFILES[f"anthropic/{model}"]
    assert profile.input_price is not None
    assert profile.output_price is not None
    read_price = profile.cached_input_price or profile.input_price
    write_price = profile.cache_write_price or profile.input_price
    reads, writes = stats.cache_read_tokens, stats.cache_write_tokens
    uncached = stats.prompt_tokens - reads - writes
    return (
        uncached * profile.input_price
        + writes * write_price
        + reads * read_price
        + stats.completion_tokens * profile.output_price
    ) / 1_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--instruction", type=int, default=2000, help="tokens")
    parser.add_argument("--itpm", type=int, default=None, help="an ITPM limit for both sides")
    parser.add_argument("--model", default=MODEL, choices=["claude-sonnet-4-5", "claude-haiku-4-5"])
    args = parser.parse_args()
    # An application configures logging; a benchmark wants only warnings.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    system = instruction(args.instruction)
    runs = [
        asyncio.run(run(mode, args.items, system, args.itpm, args.model))
        for mode in ("off", "auto")
    ]
    title = (
        f"{args.items:,} documents, {args.instruction:,}-token shared instruction, "
        f"{args.model} (caches {min_cacheable_tokens(args.model):,}+ tokens), "
        f"max_tokens {MAX_TOKENS}" + (f", ITPM {args.itpm:,}" if args.itpm else "")
    )
    table = Table(title=title)
    for column in (
        "prompt_caching",
        "ok",
        "prompt tokens",
        "cache writes",
        "cache reads",
        "ITPM tokens",
        "output",
        "cost (sim usage)",
        "cost (llmbatch)",
        "saving",
        "wall s",
    ):
        table.add_column(column, justify="left" if column == "prompt_caching" else "right")
    baseline = billed(runs[0].stats, args.model)
    for r in runs:
        s = r.stats
        cost = billed(s, args.model)
        table.add_row(
            r.mode,
            f"{r.ok:,}",
            f"{s.prompt_tokens:,}",
            f"{s.cache_write_tokens:,}",
            f"{s.cache_read_tokens:,}",
            f"{s.prompt_tokens - s.cache_read_tokens:,}",
            f"{s.completion_tokens:,}",
            f"${cost:.4f}",
            f"${r.reported_cost:.4f}",
            f"{1 - cost / baseline:.1%}" if baseline else "-",
            f"{r.seconds:.1f}",
        )
    Console(width=180).print(table)


if __name__ == "__main__":
    main()
