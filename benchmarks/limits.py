"""llmbatch's rate limiter against naive clients, side by side, against the simulator.

    python benchmarks/limits.py [--items 1000] [--quick]

Every run gets a fresh simulator process (buckets start full, ~1 s latency, max_tokens
128) and sends the same one-paragraph requests. Scenarios:

* ``rpm``: RPM 600 binds;
* ``tpm``: TPM 100,000 binds (no RPM limit; each request reserves ~50 prompt + 128 tokens);
* ``rpm+500s``: RPM 600 with 10% of requests answered 500.

Contenders: ``llmbatch`` (RateLimiter with the limits given, header feedback, shared 429
cooldown, 5xx retried with a short backoff), ``llmbatch auto`` (``Limits.auto()``: learns
the limits from the headers), ``llmbatch 4 procs redis`` (four processes sharing one
Redis-backed quota, RPM scenario only), ``gather`` (one ``asyncio.gather`` over all
items with the official client and its default retries) and ``semaphore(32)`` (the same,
32 at a time).

Columns: wall time; the least possible time (buckets start full; the 500s scenario
counts the expected extra attempts); efficiency = least / wall; items ok / failed
(the client gave up) / lost (never answered); 429s and requests seen by the server;
the most requests in flight at the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import structlog
from rich.console import Console
from rich.table import Table

from llmbatch import run_batch
from llmbatch.limits import Limits, RateLimiter
from llmbatch.testing._content import estimate_tokens
from llmbatch.tokens import admission_estimate, openai_admission_estimate

MODEL = "gpt-4o-mini"
MAX_TOKENS = 128
LATENCY = 1.0
PARAGRAPH = (
    "Item {i}: a one-paragraph document about rate limits, token buckets and the art of "
    "sending requests exactly as fast as a provider allows, and not one request faster."
)

SCENARIOS: dict[str, dict[str, Any]] = {
    "rpm": {"rpm": 600},
    "tpm": {"tpm": 100_000},
    "rpm+500s": {"rpm": 600, "errors": {500: 0.1}},
}


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PARAGRAPH.format(i=i)}]


@dataclass
class Outcome:
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


# -- the simulator process ---------------------------------------------------------------


@contextmanager
def simulator(scenario: dict[str, Any]) -> Iterator[str]:
    args = [sys.executable, "-m", "llmbatch.testing", "--ttft", str(LATENCY), "--jitter", "0.1"]
    args += ["--no-batch", "--seed", "1"]
    for name in ("rpm", "tpm"):
        if name in scenario:
            args += [f"--{name}", str(scenario[name])]
    for status, fraction in scenario.get("errors", {}).items():
        args += ["--error", f"{status}={fraction}"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        yield url.removesuffix("/v1")
    finally:
        process.terminate()
        process.wait(timeout=10)


def server_stats(root: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx2.get(f"{root}/stats").json()
    return stats


# -- contenders -------------------------------------------------------------------------


async def llmbatch_run(root: str, items: range, limits: Limits, limiter: Any = None) -> Outcome:
    limiter = limiter or RateLimiter(limits, name=f"openai/{MODEL}")
    out = Outcome()
    rng = random.Random(0)
    async with openai.AsyncOpenAI(
        base_url=f"{root}/v1", api_key="sk-bench", max_retries=0
    ) as client:

        async def one(i: int) -> str:
            msgs = messages(i)
            cost = openai_admission_estimate(msgs) + MAX_TOKENS
            for attempt in range(8):
                permit = await limiter.acquire(tokens=cost)
                try:
                    raw = await client.chat.completions.with_raw_response.create(
                        model=MODEL,
                        messages=msgs,
                        max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                    )
                except openai.RateLimitError as exc:
                    kind = exc.body.get("type") if isinstance(exc.body, dict) else None
                    retry = float(exc.response.headers.get("retry-after", "1"))
                    cooldown = limiter.on_rate_limited(
                        retry, dimension="tpm" if kind == "tokens" else "rpm"
                    )
                    if asyncio.iscoroutine(cooldown):
                        await cooldown
                    continue
                except openai.InternalServerError:
                    await asyncio.sleep(min(8.0, 0.25 * 2**attempt) * rng.random())
                    continue
                finally:
                    permit.release()
                observed = limiter.observe(raw.headers, permit)
                if asyncio.iscoroutine(observed):
                    await observed
                return raw.parse().choices[0].message.content or ""
            raise RuntimeError("gave up")

        start = time.perf_counter()
        result = await run_batch(one, items, max_concurrency=256, on_error="collect")
        out.seconds = time.perf_counter() - start
    out.ok, out.failed = result.succeeded, result.failed
    return out


async def naive_run(root: str, items: range, concurrency: int | None) -> Outcome:
    out = Outcome()
    semaphore = asyncio.Semaphore(concurrency or len(items))
    http = openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=2000))
    async with openai.AsyncOpenAI(
        base_url=f"{root}/v1", api_key="sk-bench", http_client=http
    ) as client:

        async def one(i: int) -> bool:
            async with semaphore:
                try:
                    await client.chat.completions.create(
                        model=MODEL,
                        messages=messages(i),
                        max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                    )
                except openai.APIError:
                    return False
                return True

        start = time.perf_counter()
        done = await asyncio.gather(*(one(i) for i in items))
        out.seconds = time.perf_counter() - start
    out.ok = sum(done)
    out.failed = len(done) - out.ok
    return out


# -- four processes sharing a Redis quota ------------------------------------------------


async def redis_worker(root: str, redis_url: str, first: int, count: int, start_at: float) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from redis.asyncio import Redis

    from llmbatch.limits_redis import RedisRateLimiter

    warm_up()
    redis = Redis.from_url(redis_url)
    limiter = RedisRateLimiter(redis, Limits(rpm=600), quota="bench/openai/gpt-4o-mini")
    await asyncio.sleep(max(0.0, start_at - time.time()))
    if time.time() > start_at:
        print(f"worker started late by {time.time() - start_at:.2f} s", file=sys.stderr)
    out = await llmbatch_run(root, range(first, first + count), Limits(), limiter=limiter)
    finished = time.time()
    await limiter.flush()
    await redis.aclose()
    print(json.dumps({"ok": out.ok, "failed": out.failed, "finished": finished}))


@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is needed for the 4-process run (scripts/install)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                    break
                except OSError:
                    time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


def four_processes(root: str, items: int) -> Outcome:
    with redis_server() as redis_url:
        start_at = time.time() + 6.0  # let every process import and warm up first
        share = items // 4
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    root,
                    redis_url,
                    str(k * share),
                    str(share),
                    str(start_at),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for k in range(4)
        ]
        reports = [json.loads(w.communicate()[0].strip().splitlines()[-1]) for w in workers]
    return Outcome(
        ok=sum(r["ok"] for r in reports),
        failed=sum(r["failed"] for r in reports),
        seconds=max(r["finished"] for r in reports) - start_at,
    )


# -- the table ---------------------------------------------------------------------------


def least_possible(scenario: dict[str, Any], items: int) -> float:
    attempts = items / (1.0 - sum(scenario.get("errors", {}).values()))
    if "rpm" in scenario:
        rpm = scenario["rpm"]
        return LATENCY + max(0.0, attempts - rpm) / (rpm / 60)
    tpm = scenario["tpm"]
    charged = sum(estimate_tokens({"messages": messages(i)}) + MAX_TOKENS for i in range(items))
    return LATENCY + max(0.0, charged - tpm) / (tpm / 60)


def warm_up() -> None:
    """Build the tokenizer before timing (a one-off ~0.5 s per process, not a rate cost)."""
    admission_estimate(messages(0), MODEL)


def run(name: str, scenario: dict[str, Any], items: int) -> Outcome:
    warm_up()
    with simulator(scenario) as root:
        if name == "llmbatch":
            limits = Limits(**{k: v for k, v in scenario.items() if k in ("rpm", "tpm")})
            out = asyncio.run(llmbatch_run(root, range(items), limits))
        elif name == "llmbatch auto":
            out = asyncio.run(llmbatch_run(root, range(items), Limits.auto(max_concurrency=256)))
        elif name == "llmbatch 4 procs redis":
            out = four_processes(root, items)
        elif name == "gather":
            out = asyncio.run(naive_run(root, range(items), None))
        else:
            out = asyncio.run(naive_run(root, range(items), 32))
        out.stats = server_stats(root)
    return out


def main() -> None:
    # An application configures logging; a benchmark wants only warnings.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="only the llmbatch rows")
    parser.add_argument("--scenario", choices=list(SCENARIOS), action="append")
    parser.add_argument("--client", action="append", help="only these contenders")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        root, redis_url, first, count, start_at = args.worker
        asyncio.run(redis_worker(root, redis_url, int(first), int(count), float(start_at)))
        return

    table = Table(title=f"{args.items:,} requests, max_tokens {MAX_TOKENS}, ~{LATENCY:g} s latency")
    for column in (
        "scenario",
        "client",
        "wall s",
        "least s",
        "efficiency",
        "ok",
        "failed",
        "lost",
        "429s",
        "server requests",
        "max in flight",
    ):
        table.add_column(column, justify="left" if column in ("scenario", "client") else "right")
    console = Console(width=180)
    for scenario_name in args.scenario or list(SCENARIOS):
        scenario = SCENARIOS[scenario_name]
        contenders = ["llmbatch", "llmbatch auto"]
        if scenario_name == "rpm":
            contenders.append("llmbatch 4 procs redis")
        if not args.quick:
            contenders += ["gather", "semaphore(32)"]
        if args.client:
            contenders = [c for c in contenders if c in args.client]
        least = least_possible(scenario, args.items)
        for name in contenders:
            out = run(name, scenario, args.items)
            stats = out.stats
            rate_limited = sum(stats.get("rate_limited", {}).values())
            lost = args.items - out.ok - out.failed
            table.add_row(
                scenario_name,
                name,
                f"{out.seconds:.1f}",
                f"{least:.1f}",
                f"{least / out.seconds:.3f}",
                str(out.ok),
                str(out.failed),
                str(lost),
                str(rate_limited),
                str(stats.get("requests")),
                str(stats.get("max_concurrent")),
            )
            console.print(f"  done: {scenario_name} / {name} in {out.seconds:.1f} s", style="dim")
    console.print(table)


if __name__ == "__main__":
    main()
