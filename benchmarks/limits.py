"""llmbatch's rate limiter against naive clients, side by side, against the simulator.

    python benchmarks/limits.py [--items 1000] [--quick] [--scenario rpm] [--client ...]

Every run gets a fresh simulator process (buckets start full, ~1 s latency ±10%,
max_tokens 128) and sends the same requests. Scenarios:

* ``rpm``: RPM 600 binds (one-paragraph documents, ~45 prompt tokens);
* ``tpm``: TPM 600,000 binds (no RPM limit; ~865-token documents, so each request
  reserves ~1,000 tokens);
* ``rpm+500s``: RPM 600 with 10% of requests answered 500.

Contenders: ``llmbatch`` (``LLMClient.map``, the product's own call path: limiter with
the limits given, header feedback, shared 429 cooldown, retry policy), ``llmbatch auto``
(``Limits.auto()``: learns the limits from the headers), ``llmbatch 4 procs redis``
(four processes, each an ``LLMClient`` whose quota is kept in one Redis server through
``limiter_url``; RPM scenario only) and the same with ``Limits.auto()`` learned across
the four, ``gather`` (one ``asyncio.gather`` over all items with the official client
and its default retries) and ``semaphore(32)`` (the same, 32 at a time).

Columns: wall time; the least possible time (buckets start full; the 500s scenario
counts the attempts the server admitted in that run, i.e. its fault draws); efficiency
= least / wall, shown only when every item was answered; items ok / failed
(the client gave up) / lost (never answered) / wrong (an answer that is not its own
item's: the simulator tags each answer with its prompt); 429s and requests seen by the
server; the most requests in flight at the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
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

from llmbatch.client import LLMClient
from llmbatch.config import LimiterSettings
from llmbatch.limits import Limits
from llmbatch.models import Request, Response
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.testing._content import content_tag, estimate_tokens
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
    "tpm": {"tpm": 600_000, "long": True},
    "rpm+500s": {"rpm": 600, "errors": {500: 0.1}},
    # high usage tiers: per-minute limits enforced over a few seconds (OpenAI: limits
    # "may be quantized"), with a token limit reported as OpenAI does
    "rpm 10k / 6 s": {"rpm": 10_000, "tpm": 10_000_000, "bucket": 6.0, "items": 5_000},
    "rpm 30k / 2 s": {"rpm": 30_000, "tpm": 150_000_000, "bucket": 2.0, "items": 15_000},
}
HIGH_TIERS = ("rpm 10k / 6 s", "rpm 30k / 2 s")
for _name, _scenario in SCENARIOS.items():
    _scenario["name"] = _name


def messages(i: int, scenario: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """Item *i*'s prompt: one paragraph, or ~865 tokens in the ``tpm`` scenario."""
    text = PARAGRAPH.format(i=i)
    if scenario is not None and scenario.get("long"):
        text = " ".join([text] * 21)
    return [{"role": "user", "content": text}]


@dataclass
class Outcome:
    ok: int = 0
    failed: int = 0
    wrong: int = 0
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
    if "bucket" in scenario:
        args += ["--bucket-seconds", str(scenario["bucket"])]
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


async def llmbatch_run(
    root: str,
    items: range,
    limits: Limits | None,
    scenario: dict[str, Any],
    *,
    limiter_url: str | LimiterSettings = "memory",
) -> Outcome:
    """The product's own path: ``LLMClient.map`` over the official client."""
    out = Outcome()
    requests = [Request(messages=messages(i, scenario), key=str(i)) for i in items]
    provider = OpenAIProvider(base_url=f"{root}/v1", api_key="sk-bench")
    async with LLMClient(
        provider, model=MODEL, max_tokens=MAX_TOKENS, limits=limits, limiter_url=limiter_url
    ) as client:
        start = time.perf_counter()
        # default arguments: no max_concurrency (in flight follows the limits)
        result = await client.map(requests, on_error="collect")
        out.seconds = time.perf_counter() - start
    for request, answer in zip(requests, result.results, strict=True):
        if isinstance(answer, Response):
            tag = content_tag(request.messages[-1]["content"])
            out.ok += answer.text.startswith(f"[{tag}]")
            out.wrong += not answer.text.startswith(f"[{tag}]")
        else:
            out.failed += 1
    return out


async def naive_run(
    root: str, items: range, concurrency: int | None, scenario: dict[str, Any]
) -> Outcome:
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
                        messages=messages(i, scenario),  # type: ignore[arg-type]
                        max_tokens=MAX_TOKENS,
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


def cli_run(root: str, items: int, scenario: dict[str, Any]) -> Outcome:
    """``llmbatch run`` as a user types it: ``--rpm``/``--tpm``, no ``--concurrency``.
    Timed from the process start, less a ``--limit 0`` run of the same command
    (interpreter, imports, the tokenizer, the empty output: not a rate cost)."""
    out = Outcome()
    with tempfile.TemporaryDirectory() as folder:
        source = f"{folder}/in.jsonl"
        with open(source, "w", encoding="utf-8") as f:
            for i in range(items):
                text = messages(i, scenario)[0]["content"]
                f.write(json.dumps({"id": str(i), "text": text}) + "\n")

        def command(output: str, *extra: str) -> float:
            args = [sys.executable, "-m", "llmbatch", "run", source, "-o", output, "--cache", "off"]
            args += ["--provider", f"{root}/v1", "--model", MODEL, "--prompt", "{text}"]
            args += ["--id-field", "id", "--max-tokens", str(MAX_TOKENS), "-q"]
            for name in ("rpm", "tpm"):
                if name in scenario:
                    args += [f"--{name}", str(scenario[name])]
            env = {**os.environ, "OPENAI_API_KEY": "sk-bench"}
            start = time.perf_counter()
            subprocess.run([*args, *extra], env=env, check=False, capture_output=True)
            return time.perf_counter() - start

        start_up = command(f"{folder}/empty.jsonl", "--limit", "0")
        out.seconds = command(f"{folder}/out.jsonl") - start_up
        with open(f"{folder}/out.jsonl", encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
    for i, line in enumerate(lines):
        if line["status"] != "ok":
            out.failed += line["status"] == "error"
            continue
        tag = content_tag(messages(i, scenario)[0]["content"])
        good = str(line["answer"]).startswith(f"[{tag}]")
        out.ok += good
        out.wrong += not good
    return out


# -- four processes sharing a Redis quota ------------------------------------------------


async def redis_worker(
    root: str, redis_url: str, first: int, count: int, start_at: float, kind: str
) -> None:
    auto = kind.startswith("auto")
    scenario = SCENARIOS[kind.split(":", 1)[1]]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    warm_up()
    # Quotas kept in Redis, as llmbatch.toml's [limiter] url would say: one per run.
    quotas = LimiterSettings(url=redis_url, namespace=f"bench-{start_at:.0f}")
    explicit = Limits(**{k: v for k, v in scenario.items() if k in ("rpm", "tpm")})
    limits = Limits.auto() if auto else explicit
    await asyncio.sleep(max(0.0, start_at - time.time()))
    if time.time() > start_at + 0.05:
        print(f"worker started late by {time.time() - start_at:.2f} s", file=sys.stderr)
    out = await llmbatch_run(
        root, range(first, first + count), limits, scenario, limiter_url=quotas
    )
    finished = time.time()
    report = {"ok": out.ok, "failed": out.failed, "wrong": out.wrong, "finished": finished}
    print(json.dumps(report))


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


def four_processes(
    root: str, items: int, scenario: dict[str, Any], *, auto: bool = False
) -> Outcome:
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
                    ("auto:" if auto else "explicit:") + scenario["name"],
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
        wrong=sum(r["wrong"] for r in reports),
        seconds=max(r["finished"] for r in reports) - start_at,
    )


# -- the table ---------------------------------------------------------------------------


def least_possible(scenario: dict[str, Any], items: int, admitted: int | None = None) -> float:
    """The least possible wall time, buckets starting full. With injected errors the
    attempts needed are the requests the server admitted (answered, 200 or 500: the
    fault draws a run actually got), or the expected number before a run."""
    attempts: float = items / (1.0 - sum(scenario.get("errors", {}).values()))
    if admitted is not None and scenario.get("errors"):
        attempts = admitted
    if "rpm" in scenario:
        rpm = scenario["rpm"]
        burst = rpm * scenario.get("bucket", 60.0) / 60  # what the server holds at once
        return float(LATENCY + max(0.0, attempts - burst) / (rpm / 60))
    tpm = scenario["tpm"]
    charged = sum(
        estimate_tokens({"messages": messages(i, scenario)}) + MAX_TOKENS for i in range(items)
    )
    return float(LATENCY + max(0.0, charged - tpm) / (tpm / 60))


def warm_up() -> None:
    """Build the tokenizer before timing (a one-off ~0.5 s per process, not a rate cost)."""
    admission_estimate(messages(0), MODEL)
    openai_admission_estimate(messages(0))


def run(name: str, scenario: dict[str, Any], items: int) -> Outcome:
    warm_up()
    with simulator(scenario) as root:
        explicit = Limits(**{k: v for k, v in scenario.items() if k in ("rpm", "tpm")})
        auto = Limits.auto()
        if name == "llmbatch":
            out = asyncio.run(llmbatch_run(root, range(items), explicit, scenario))
        elif name == "llmbatch auto":
            out = asyncio.run(llmbatch_run(root, range(items), auto, scenario))
        elif name == "llmbatch 4 procs redis":
            out = four_processes(root, items, scenario)
        elif name == "llmbatch 4 procs redis auto":
            out = four_processes(root, items, scenario, auto=True)
        elif name == "llmbatch profile":
            # no limits argument: gpt-4o-mini's built-in first-tier profile (500 RPM)
            out = asyncio.run(llmbatch_run(root, range(items), None, scenario))
        elif name == "llmbatch run":
            out = cli_run(root, items, scenario)
        elif name == "gather":
            out = asyncio.run(naive_run(root, range(items), None, scenario))
        elif name.startswith("semaphore("):
            size = int(name.removeprefix("semaphore(").removesuffix(")"))
            out = asyncio.run(naive_run(root, range(items), size, scenario))
        else:
            raise ValueError(name)
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
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument(
        "--high", action="store_true", help="the high-tier scenarios (RPM 10,000 and 30,000)"
    )
    args = parser.parse_args()
    if args.worker:
        root, redis_url, first, count, start_at, kind = args.worker
        asyncio.run(redis_worker(root, redis_url, int(first), int(count), float(start_at), kind))
        return

    table = Table(title=f"max_tokens {MAX_TOKENS}, ~{LATENCY:g} s latency, default arguments")
    for column in (
        "scenario",
        "client",
        "items",
        "wall s",
        "least s",
        "efficiency",
        "ok",
        "failed",
        "lost",
        "wrong",
        "429s",
        "server requests",
        "max in flight",
    ):
        table.add_column(column, justify="left" if column in ("scenario", "client") else "right")
    console = Console(width=180)
    chosen = args.scenario or [n for n in SCENARIOS if n not in HIGH_TIERS]
    if args.high:
        chosen = list(HIGH_TIERS)
    for scenario_name in chosen:
        scenario = SCENARIOS[scenario_name]
        items = scenario.get("items", args.items)
        contenders = ["llmbatch", "llmbatch auto"]
        if scenario_name in HIGH_TIERS:
            contenders += ["llmbatch profile", "llmbatch run"]
        if scenario_name in ("rpm", "rpm 30k / 2 s"):
            contenders += ["llmbatch 4 procs redis", "llmbatch 4 procs redis auto"]
        if not args.quick:
            contenders += ["gather", "semaphore(32)"]
            if scenario_name in HIGH_TIERS:
                contenders.append("semaphore(512)")
        if args.client:
            contenders = [c for c in contenders if c in args.client]
        for name in contenders:
            out = run(name, scenario, items)
            stats = out.stats
            rate_limited = sum(stats.get("rate_limited", {}).values())
            lost = items - out.ok - out.failed - out.wrong
            # A run that answered every item: its own fault draws; otherwise the expected.
            admitted = int(stats.get("requests", 0)) - rate_limited
            least = least_possible(scenario, items, admitted if out.ok == items else None)
            # Efficiency only means something when every item was answered: a client
            # that gives up on items is fast for nothing.
            efficiency = f"{least / out.seconds:.3f}" if out.ok == items else "-"
            table.add_row(
                scenario_name,
                name,
                f"{items:,}",
                f"{out.seconds:.1f}",
                f"{least:.1f}",
                efficiency,
                str(out.ok),
                str(out.failed),
                str(lost),
                str(out.wrong),
                str(rate_limited),
                str(stats.get("requests")),
                str(stats.get("max_concurrent")),
            )
            console.print(f"  done: {scenario_name} / {name} in {out.seconds:.1f} s", style="dim")
    console.print(table)


if __name__ == "__main__":
    main()
