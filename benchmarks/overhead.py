"""Scheduling overhead of llmbatch's runner, against a bare asyncio loop, in one run.

    python benchmarks/overhead.py [--items 100000] [--concurrency 64] [--rounds 5]
                                  [--stream-items 1000000]

Throughput: N items with a zero-cost async ``exec`` through

* a bare ``asyncio.Semaphore`` + ``asyncio.gather`` loop (the baseline: one task per item),
* ``llmbatch.run_batch`` (ordered results, failure policy),
* ``llmbatch.stream_batch`` (outcomes as they finish),
* ``AsyncParallelBatchNode`` (the flow layer on top: retry loop, per-item state),

each with an ``exec`` that returns at once and one that suspends once (``sleep(0)``), the
shape of every real I/O call.

Rounds are interleaved and the best round of each is reported, because this machine is
shared and noisy; the ratio is llmbatch / bare (higher is better, target >= 0.9).

Memory: peak RSS growth while 1,000,000 items stream from a generator through
``stream_batch``, measured in a fresh subprocess (VmHWM - VmRSS before; target < 50 MB),
next to the bare loop over 100,000 items for scale.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from llmbatch import AsyncParallelBatchNode, run_batch, stream_batch


async def zero_cost(item: int) -> int:
    return item


async def one_yield(item: int) -> int:
    await asyncio.sleep(0)  # an exec that suspends once, as any real I/O does
    return item


WORK = {"zero-cost": zero_cost, "awaits once": one_yield}


async def bare(items: int, concurrency: int, work: Callable[[int], Awaitable[int]]) -> None:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(item: int) -> int:
        async with semaphore:
            return await work(item)

    results = await asyncio.gather(*(one(i) for i in range(items)))
    assert len(results) == items


async def runner(items: int, concurrency: int, work: Callable[[int], Awaitable[int]]) -> None:
    result = await run_batch(work, range(items), max_concurrency=concurrency)
    assert len(result) == items


async def streamed(items: int, concurrency: int, work: Callable[[int], Awaitable[int]]) -> None:
    count = 0
    async with stream_batch(work, range(items), max_concurrency=concurrency) as outcomes:
        async for _ in outcomes:
            count += 1
    assert count == items


class Echo(AsyncParallelBatchNode):
    work: Callable[[int], Awaitable[int]]

    async def exec_async(self, prep_res: Any) -> Any:
        return await self.work(prep_res)


async def node(items: int, concurrency: int, work: Callable[[int], Awaitable[int]]) -> None:
    echo = Echo(max_concurrency=concurrency)
    echo.work = work
    out = await echo._exec(range(items))
    assert len(out) == items


CASES: dict[str, Callable[[int, int, Callable[[int], Awaitable[int]]], Awaitable[None]]] = {
    "bare Semaphore + gather": bare,
    "llmbatch.run_batch": runner,
    "llmbatch.stream_batch": streamed,
    "AsyncParallelBatchNode": node,
}


def time_case(case: str, work: str, items: int, concurrency: int) -> float:
    start = time.perf_counter()
    asyncio.run(CASES[case](items, concurrency, WORK[work]))
    return time.perf_counter() - start


MEMORY_PROBE = r"""
import asyncio, sys
from llmbatch import stream_batch

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024  # MB

async def zero_cost(item):
    return item

async def main(mode, items, concurrency):
    if mode == "stream":
        async with stream_batch(zero_cost, (i for i in range(items)), max_concurrency=concurrency) as out:
            async for _ in out:
                pass
    else:
        semaphore = asyncio.Semaphore(concurrency)
        async def one(i):
            async with semaphore:
                return await zero_cost(i)
        await asyncio.gather(*(one(i) for i in range(items)))

asyncio.run(main(sys.argv[1], 1000, int(sys.argv[3])))  # warm up imports and the loop
before = status("VmRSS:")
asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
print(before, status("VmHWM:"))
"""


def peak_rss_growth(mode: str, items: int, concurrency: int) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, mode, str(items), str(concurrency)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    before, peak = float(out[0]), float(out[1])
    return before, peak - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stream-items", type=int, default=1_000_000)
    args = parser.parse_args()

    best = {(work, case): float("inf") for work in WORK for case in CASES}
    for _ in range(args.rounds):
        for work, case in best:  # interleaved, so drift hits every case alike
            seconds = time_case(case, work, args.items, args.concurrency)
            best[work, case] = min(best[work, case], seconds)

    console = Console()
    table = Table(
        title=f"{args.items:,} items, max_concurrency={args.concurrency}, "
        f"best of {args.rounds} interleaved rounds"
    )
    for column in ("exec", "scheduler", "seconds", "items/s", "vs bare"):
        table.add_column(column, justify="left" if column in ("exec", "scheduler") else "right")
    for (work, case), seconds in best.items():
        baseline = args.items / best[work, "bare Semaphore + gather"]
        rate = args.items / seconds
        table.add_row(work, case, f"{seconds:.3f}", f"{rate:,.0f}", f"{rate / baseline:.2f}x")
    console.print(table)

    memory = Table(title="peak RSS growth while items run (fresh process, after warm-up)")
    for column in ("what", "items", "RSS before (MB)", "peak growth (MB)"):
        memory.add_column(column, justify="right" if column != "what" else "left")
    before, growth = peak_rss_growth("stream", args.stream_items, args.concurrency)
    memory.add_row(
        "stream_batch over a generator", f"{args.stream_items:,}", f"{before:.1f}", f"{growth:.1f}"
    )
    before, growth = peak_rss_growth("bare", args.items, args.concurrency)
    memory.add_row("bare Semaphore + gather", f"{args.items:,}", f"{before:.1f}", f"{growth:.1f}")
    console.print(memory)


if __name__ == "__main__":
    main()
