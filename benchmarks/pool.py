"""Key pools against the simulator: one key, three keys, three keys with one revoked.

    python benchmarks/pool.py [--rpm 600] [--per-key 1200]

The simulator (in this process, real time, ~0.5 s latency) enforces ``--rpm`` per key,
as a provider does. Rows:

* ``1 key``: ``--per-key`` requests through one key;
* ``3 keys``: three times as many through a ``KeyPool`` of three keys, which should take
  the same time (three times the throughput);
* ``3 keys, one revoked``: the same, the second key answering 401 once it has served a
  sixth of its share; the job should finish on the other two.

Columns: wall seconds; the least time the limits allow (each key's bucket starts full:
a minute's worth at once, then ``rpm`` a minute; not computed for the revoked row);
efficiency = least / wall; items ok / failed; 429s the server sent (the revoked key's
401s are not 429s); requests per key as the server saw them.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

from rich.console import Console
from rich.table import Table

import llmbatch
from llmbatch.limits import Limits
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.providers.pool import KeyPool
from llmbatch.testing import Fault, RequestInfo, Simulator

KEYS = ["sk-bench-key-1111", "sk-bench-key-2222", "sk-bench-key-3333"]


async def run(
    keys: list[str], items: int, rpm: int, revoke_after: int | None = None
) -> tuple[float, int, int, int, Counter[str]]:
    seen: Counter[str] = Counter()

    def script(info: RequestInfo) -> Fault | None:
        seen[info.api_key] += 1
        if revoke_after is not None and info.api_key == keys[1] and seen[keys[1]] > revoke_after:
            return Fault(status=401)
        return None

    async with Simulator(rpm=rpm, ttft=0.5, script=script) as sim:
        providers = [OpenAIProvider(base_url=sim.base_url, api_key=k) for k in keys]
        provider = providers[0] if len(providers) == 1 else KeyPool(providers)
        started = time.perf_counter()
        async with provider:
            result = await llmbatch.map(
                "{item}",
                [f"pooled document {i}" for i in range(items)],
                model="gpt-4o-mini",
                provider=provider,
                limits=Limits(rpm=rpm),
                max_tokens=16,
                on_error="collect",
            )
        seconds = time.perf_counter() - started
        throttled = sim.stats().throttled
    return seconds, len(result.ok), len(result.errors), throttled, seen


def least(items: int, keys: int, rpm: int) -> float:
    """The least time: every key's first minute at once, then rpm a minute each."""
    return 0.5 + max(0.0, items - keys * rpm) / (keys * rpm / 60)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--per-key", type=int, default=1200)
    args = parser.parse_args()
    rpm, n = args.rpm, args.per_key
    rows = [
        ("1 key", KEYS[:1], n, None, least(n, 1, rpm)),
        ("3 keys", KEYS, 3 * n, None, least(3 * n, 3, rpm)),
        # one key lost after a sixth of its share: the other two carry the rest
        ("3 keys, one revoked", KEYS, 3 * n, n // 6, None),
    ]
    table = Table(title=f"KeyPool, {rpm} RPM per key, ~0.5 s latency")
    for column in ("run", "items", "wall s", "least s", "efficiency", "ok/failed", "429s"):
        table.add_column(column, justify="left" if column == "run" else "right")
    table.add_column("requests per key")
    for name, keys, items, revoke, best in rows:
        seconds, ok, failed, throttled, seen = await run(keys, items, rpm, revoke)
        table.add_row(
            name,
            f"{items:,}",
            f"{seconds:.1f}",
            f"{best:.1f}" if best is not None else "-",
            f"{best / seconds:.3f}" if best is not None and ok == items else "-",
            f"{ok}/{failed}",
            str(throttled),
            ", ".join(f"…{k[-4:]}: {seen[k]}" for k in keys),
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    asyncio.run(main())
