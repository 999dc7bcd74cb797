"""The client's own request throughput when no limit binds, side by side, in one run.

    python benchmarks/throughput.py [--items 5000] [--concurrency 256] [--rounds 1]
                                    [--memory-items 100000] [--quick] [--contender ...]

On this 2-core machine one round takes ~4-5 minutes and the 100,000-record memory row
~10-20 (the official client spends ~5 ms of CPU per request); ``--quick`` (1,000 requests,
10,000 records) takes ~2-3 minutes, ``--memory-items 0`` skips the memory row, and
``--rounds 3`` gives best-of-three when the machine is busy.

The simulator runs in its own process (``--ttft 0.02``, no rpm/tpm, no batch API), and
every contender sends the same N chat requests (the CLI's default prompt over a tiny
document, ``max_tokens`` 16) with at most C in flight:

* ``llmbatch.map``: the one-call API, ``limits=Limits(rpm=10_000_000, tpm=10**12)``,
  ``max_concurrency=C``, over ``OpenAIProvider(base_url=..., api_key=...)`` (whose
  default transport is the SDK's aiohttp one);
* ``LLMClient.map``: the same through the client's own batch entry point;
* ``llmbatch run``: the CLI as a subprocess on a JSONL file of N records
  (``--rpm 10000000 --tpm 1000000000000 --concurrency C -q``, a fresh checkpoint).
  Its whole command is timed, and again minus a ``--limit 0`` run of the same command
  (interpreter and imports, provider set-up, store creation, the empty output), which is
  the "minus start-up" row;
* ``bare openai``: ``openai.AsyncOpenAI(max_retries=0)`` in an ``asyncio.Semaphore(C)``
  loop, with an httpx2 pool that keeps C connections alive (the SDK's default pool,
  ``DEFAULT_CONNECTION_LIMITS`` in ``openai/_constants.py``, is ``max_connections=1000,
  max_keepalive_connections=100``: with C > 100 every finished request beyond the
  hundredth closes its connection and the next one opens a new one);
* ``bare openai, SDK default pool``: the same with that default pool;
* ``bare openai, aiohttp transport``: the same loop with ``openai.DefaultAioHttpClient``
  (the SDK's vendored aiohttp transport, pool of C), and ``llmbatch.map, httpx
  transport``: ``llmbatch.map`` over ``OpenAIProvider(transport="httpx")``. These show
  how much of the per-request cost is the httpx2/httpcore2 transport's;
* ``bare aiohttp``: ``aiohttp`` posting the same JSON bodies, ``TCPConnector(limit=C)``.

Each in-process contender runs in a fresh subprocess of this script, so CPU seconds
(``resource.getrusage``, user + system, of the timed part only: imports and the
tokenizer warm-up are excluded) and peak RSS (``ru_maxrss``) do not mix; the CLI's are
its own process's (``os.wait4``). "server CPU s" is what the simulator burned meanwhile:
this machine has 2 cores, so client and server compete for them. Rounds are interleaved
and each contender's best round is shown, because the machine is shared and noisy.

Memory: ``--memory-items`` (100,000) tiny records through ``llmbatch run`` against a
``--ttft 0`` simulator, with the peak RSS of the llmbatch process (``ru_maxrss`` from
``os.wait4``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from rich.console import Console
from rich.table import Table

MODEL = "gpt-4o-mini"
MAX_TOKENS = 16
API_KEY = "sk-bench"
TTFT = 0.02
# The CLI's default prompt (llmbatch.job.DEFAULT_TEMPLATE) over a tiny document, so every
# contender sends byte-for-byte the bodies ``llmbatch run`` sends.
TEMPLATE = "Summarize the following document in one or two sentences.\n\n{text}"
DOCUMENT = "Document {i}: rate limits, token buckets and keep-alive connections."
BARE_OPENAI = "bare openai"


def document(i: int) -> dict[str, Any]:
    return {"id": f"doc-{i}", "text": DOCUMENT.format(i=i)}


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": TEMPLATE.format(**document(i))}]


@dataclass
class Measure:
    """One contender's run: what the table shows."""

    seconds: float
    ok: int
    cpu: float | None = None
    rss_mb: float | None = None
    server_cpu: float | None = None


# -- the simulator process ---------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) process *pid* has used so far, where /proc exists."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def simulator(ttft: float) -> Iterator[tuple[str, int]]:
    """A simulator in its own process, no limits: its ``/v1`` URL and its pid."""
    args = [sys.executable, "-m", "llmbatch.testing", "--ttft", str(ttft), "--no-batch"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        yield process.stdout.readline().strip(), process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


# -- in-process contenders (each run in a fresh subprocess: see worker()) ----------------


def unlimited() -> Any:
    from llmbatch.limits import Limits

    return Limits(rpm=10_000_000, tpm=10**12)


def aiohttp_sdk_client(url: str, concurrency: int) -> Any:
    """An ``openai.AsyncOpenAI`` on the SDK's aiohttp transport, keeping C connections."""
    import httpx2
    import openai

    pool = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return openai.AsyncOpenAI(
        base_url=url,
        api_key=API_KEY,
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(limits=pool),
    )


async def llmbatch_map(url: str, items: int, concurrency: int, *, httpx: bool = False) -> int:
    import llmbatch
    from llmbatch.providers.openai import OpenAIProvider

    docs = [document(i) for i in range(items)]
    transport = "httpx" if httpx else "aiohttp"
    async with OpenAIProvider(base_url=url, api_key=API_KEY, transport=transport) as provider:
        result = await llmbatch.map(
            TEMPLATE,
            docs,
            model=MODEL,
            provider=provider,
            max_tokens=MAX_TOKENS,
            limits=unlimited(),
            max_concurrency=concurrency,
        )
    return sum(isinstance(r, llmbatch.Response) for r in result.results)


async def client_map(url: str, items: int, concurrency: int) -> int:
    from llmbatch import LLMClient, Request, Response
    from llmbatch.providers.openai import OpenAIProvider

    requests = [Request(messages=messages(i), key=str(i)) for i in range(items)]
    provider = OpenAIProvider(base_url=url, api_key=API_KEY)
    async with LLMClient(
        provider, model=MODEL, max_tokens=MAX_TOKENS, limits=unlimited()
    ) as client:
        result = await client.map(requests, on_error="collect", max_concurrency=concurrency)
    return sum(isinstance(r, Response) for r in result.results)


async def bare_openai(url: str, items: int, concurrency: int, *, pool: str) -> int:
    import httpx2
    import openai

    semaphore = asyncio.Semaphore(concurrency)
    if pool == "aiohttp":
        sdk = aiohttp_sdk_client(url, concurrency)
    else:
        limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        http = openai.DefaultAsyncHttpxClient(limits=limits) if pool == "tuned" else None
        sdk = openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0, http_client=http)
    async with sdk as client:

        async def one(i: int) -> bool:
            async with semaphore:
                completion = await client.chat.completions.create(
                    model=MODEL,
                    messages=messages(i),
                    max_tokens=MAX_TOKENS,
                )
                return bool(completion.choices)

        return sum(await asyncio.gather(*(one(i) for i in range(items))))


async def bare_aiohttp(url: str, items: int, concurrency: int) -> int:
    import aiohttp

    semaphore = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(i: int) -> bool:
            body = {"model": MODEL, "messages": messages(i), "max_tokens": MAX_TOKENS}
            async with semaphore, session.post(f"{url}/chat/completions", json=body) as r:
                answer = await r.json()
                return r.status == 200 and bool(answer["choices"])

        return sum(await asyncio.gather(*(one(i) for i in range(items))))


async def bare_openai_tuned(url: str, items: int, concurrency: int) -> int:
    return await bare_openai(url, items, concurrency, pool="tuned")


async def bare_openai_default(url: str, items: int, concurrency: int) -> int:
    return await bare_openai(url, items, concurrency, pool="default")


async def bare_openai_aiohttp(url: str, items: int, concurrency: int) -> int:
    return await bare_openai(url, items, concurrency, pool="aiohttp")


async def llmbatch_map_httpx(url: str, items: int, concurrency: int) -> int:
    return await llmbatch_map(url, items, concurrency, httpx=True)


IN_PROCESS: dict[str, Callable[[str, int, int], Coroutine[Any, Any, int]]] = {
    "llmbatch.map": llmbatch_map,
    "LLMClient.map": client_map,
    BARE_OPENAI: bare_openai_tuned,
    "bare openai, SDK default pool": bare_openai_default,
    "bare openai, aiohttp transport": bare_openai_aiohttp,
    "llmbatch.map, httpx transport": llmbatch_map_httpx,
    "bare aiohttp": bare_aiohttp,
}
CLI = "llmbatch run"
CLI_NET = "llmbatch run, minus start-up"
CONTENDERS = [*list(IN_PROCESS)[:2], CLI, *list(IN_PROCESS)[2:]]


def warm_up() -> None:
    """Import everything and build the tokenizer: one-off costs, not per request."""
    import aiohttp  # noqa: F401
    import openai  # noqa: F401

    import llmbatch  # noqa: F401
    from llmbatch.providers import openai as _provider  # noqa: F401
    from llmbatch.tokens import admission_estimate, openai_admission_estimate

    admission_estimate(messages(0), MODEL)
    openai_admission_estimate(messages(0))


def worker(name: str, url: str, items: int, concurrency: int) -> None:
    """Run one in-process contender and print its :class:`Measure` as JSON."""
    warm_up()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    ok = asyncio.run(IN_PROCESS[name](url, items, concurrency))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(json.dumps(asdict(Measure(seconds, ok, cpu, after.ru_maxrss / 1024))))


def in_process(name: str, url: str, items: int, concurrency: int) -> Measure:
    args = [sys.executable, __file__, "--worker", name, url, str(items), str(concurrency)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return Measure(**json.loads(out.strip().splitlines()[-1]))


# -- the CLI -----------------------------------------------------------------------------


def write_input(path: Path, items: int) -> None:
    with path.open("w") as f:
        for i in range(items):
            f.write(json.dumps(document(i)) + "\n")


def cli(url: str, source: Path, concurrency: int, *, limit: int | None = None) -> Measure:
    """``llmbatch run`` on *source* with a fresh checkpoint; wall, CPU and peak RSS of
    the llmbatch process itself (``os.wait4``)."""
    out = source.with_name("out.jsonl")
    args = ["llmbatch", "run", str(source), "-o", str(out), "--provider", url, "--cache", "off"]
    args += ["--model", MODEL, "--max-tokens", str(MAX_TOKENS), "--id-field", "id"]
    args += ["--rpm", "10000000", "--tpm", "1000000000000", "--concurrency", str(concurrency)]
    args += ["--fresh", "-q"]
    if limit is not None:
        args += ["--limit", str(limit)]
    start = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    assert process.stderr is not None
    stderr = process.stderr.read().decode()
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"llmbatch run exited {process.returncode}:\n{stderr}")
    with out.open() as f:
        ok = sum(json.loads(line)["status"] == "ok" for line in f)
    return Measure(seconds, ok, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


# -- the table ---------------------------------------------------------------------------


def timed_on(server: int, run: Callable[[], Measure]) -> Measure:
    before = cpu_seconds(server)
    measure = run()
    after = cpu_seconds(server)
    if before is not None and after is not None:
        measure.server_cpu = after - before
    return measure


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    # An application configures logging; a benchmark wants only warnings.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--memory-items", type=int, default=100_000)
    parser.add_argument(
        "--quick", action="store_true", help="1,000 items, one round, 10,000 for memory"
    )
    parser.add_argument("--contender", choices=CONTENDERS, action="append")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, url, items, concurrency = args.worker
        worker(name, url, int(items), int(concurrency))
        return
    if args.quick:
        args.items, args.rounds, args.memory_items = 1000, 1, 10_000
    contenders = args.contender or CONTENDERS
    console = Console(width=160)

    best: dict[str, Measure] = {}
    with tempfile.TemporaryDirectory() as workdir:
        source = Path(workdir) / "in.jsonl"
        write_input(source, args.items)
        with simulator(TTFT) as (url, server):
            for round_ in range(args.rounds):
                for name in contenders:  # interleaved, so drift hits every contender alike
                    if name == CLI:
                        runs = {
                            CLI: timed_on(server, partial(cli, url, source, args.concurrency)),
                            "start-up": cli(url, source, args.concurrency, limit=0),
                        }
                    else:
                        runs = {
                            name: timed_on(
                                server,
                                partial(in_process, name, url, args.items, args.concurrency),
                            )
                        }
                    for key, measure in runs.items():
                        if key not in best or measure.seconds < best[key].seconds:
                            best[key] = measure
                    console.print(
                        f"  round {round_ + 1}: {name} {runs[name].seconds:.2f} s", style="dim"
                    )
        if CLI in best:
            whole, startup = best[CLI], best.pop("start-up")
            best[CLI_NET] = Measure(
                whole.seconds - startup.seconds,
                whole.ok,
                None if whole.cpu is None or startup.cpu is None else whole.cpu - startup.cpu,
            )

        memory: Measure | None = None
        if args.memory_items and CLI in contenders:
            big = Path(workdir) / "memory" / "in.jsonl"
            big.parent.mkdir()
            write_input(big, args.memory_items)
            with simulator(0.0) as (url, server):
                memory = timed_on(server, partial(cli, url, big, args.concurrency))

    table = Table(
        title=f"{args.items:,} requests, concurrency {args.concurrency}, simulator ttft "
        f"{TTFT:g} s, no limit binding; best of {args.rounds} interleaved rounds"
    )
    columns = ["contender", "requests", "wall s", "requests/s", "vs bare openai"]
    columns += ["client CPU s", "CPU ms/request", "peak RSS MB", "server CPU s"]
    for column in columns:
        table.add_column(column, justify="left" if column == "contender" else "right")
    order = [*CONTENDERS[:3], CLI_NET, *CONTENDERS[3:]]
    baseline = best.get(BARE_OPENAI)
    for name in (n for n in order if n in best):
        m = best[name]
        rate = args.items / m.seconds
        ratio = f"{rate / (args.items / baseline.seconds):.2f}x" if baseline else "-"
        per_request = None if m.cpu is None else m.cpu * 1000 / args.items
        table.add_row(
            name,
            f"{m.ok:,}/{args.items:,}",
            f"{m.seconds:.2f}",
            f"{rate:,.0f}",
            ratio,
            fmt(m.cpu, ".2f"),
            fmt(per_request, ".2f"),
            fmt(m.rss_mb, ".0f"),
            fmt(m.server_cpu, ".2f"),
        )
    console.print(table)
    if memory is not None:
        rows = Table(title="memory: llmbatch run over tiny documents, simulator ttft 0")
        for column in ("what", "records", "wall s", "records/s", "client CPU s", "peak RSS MB"):
            rows.add_column(column, justify="left" if column == "what" else "right")
        rows.add_row(
            "llmbatch run",
            f"{memory.ok:,}/{args.memory_items:,}",
            f"{memory.seconds:.1f}",
            f"{args.memory_items / memory.seconds:,.0f}",
            fmt(memory.cpu, ".1f"),
            fmt(memory.rss_mb, ".0f"),
        )
        console.print(rows)


if __name__ == "__main__":
    main()
