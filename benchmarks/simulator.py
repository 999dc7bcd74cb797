"""How many requests per second the simulator sustains (target: >= 1,500 req/s on one core).

The simulator runs in its own process (``python -m llmbatch.testing``), so it has a core
to itself and the client's work is not counted against it. This process drives it with
trivial chat requests over keep-alive connections: first a raw aiohttp client (the
simulator's own ceiling), then the official openai client (what a real pipeline sees).

    python benchmarks/simulator.py [--requests 20000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import openai
from rich.console import Console
from rich.table import Table

Call = Callable[[int], Awaitable[None]]


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far, where /proc exists."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(call: Call, total: int, concurrency: int) -> tuple[float, list[float]]:
    """Run *total* calls, *concurrency* at a time; return the wall time and each latency."""
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def _row(
    table: Table,
    name: str,
    total: int,
    seconds: float,
    latencies: list[float],
    server_cpu: float | None,
) -> None:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    table.add_row(
        name,
        f"{total:,}",
        f"{seconds:.2f}",
        f"{total / seconds:,.0f}",
        f"{p50 * 1000:.1f}",
        f"{p99 * 1000:.1f}",
        "n/a" if server_cpu is None else f"{server_cpu / total * 1e6:.0f}",
        "n/a" if not server_cpu else f"{total / server_cpu:,.0f}",
    )


def _body(i: int) -> bytes:
    # distinct content per request, so the simulator's duplicate accounting does real work
    message = {"role": "user", "content": f"item {i}"}
    return json.dumps({"model": "gpt-4o-mini", "messages": [message], "max_tokens": 16}).encode()


async def main(total: int, concurrency: int, openai_total: int) -> None:
    # --rpm/--tpm high enough never to throttle, so the rate-limit path is measured too
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmbatch.testing",
        "--port",
        "0",
        "--rpm",
        "100000000",
        "--tpm",
        "100000000000",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert server.stdout is not None
        base_url = (await server.stdout.readline()).decode().strip()
        table = Table(title=f"llmbatch simulator, {os.cpu_count()} CPUs, concurrency {concurrency}")
        columns = ("requests", "seconds", "req/s", "p50 ms", "p99 ms", "server CPU µs/req")
        for column in ("client", *columns, "req/s per server core"):
            table.add_column(column, justify="left" if column == "client" else "right")

        headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

            async def raw(i: int) -> None:
                async with session.post(f"{base_url}/chat/completions", data=_body(i)) as reply:
                    if reply.status != 200:
                        raise RuntimeError(f"unexpected status {reply.status}")
                    await reply.read()

            await _drive(raw, 500, concurrency)  # warm up connections and code paths
            cpu = _cpu_seconds(server.pid)
            seconds, latencies = await _drive(raw, total, concurrency)
            used = None if cpu is None else _cpu_seconds(server.pid) - cpu  # type: ignore[operator]
            _row(table, "aiohttp (raw)", total, seconds, latencies, used)

        async with openai.AsyncOpenAI(
            base_url=base_url, api_key="sk-bench", max_retries=0
        ) as client:

            async def sdk(i: int) -> None:
                await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": f"item {i}"}],
                    max_tokens=16,
                )

            await _drive(sdk, 200, concurrency)
            cpu = _cpu_seconds(server.pid)
            seconds, latencies = await _drive(sdk, openai_total, concurrency)
            used = None if cpu is None else _cpu_seconds(server.pid) - cpu  # type: ignore[operator]
            _row(table, "openai SDK", openai_total, seconds, latencies, used)
        Console(width=120).print(table)
    finally:
        server.terminate()
        await server.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="raw aiohttp requests")
    parser.add_argument("--openai-requests", type=int, default=3_000, help="openai SDK requests")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.concurrency, args.openai_requests))
