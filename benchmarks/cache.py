"""What the response cache and the in-job dedupe save, with ``llmbatch run`` against the
simulator, side by side in one run.

    python benchmarks/cache.py [--docs 2000] [--redis-server redis-server] [--limits profile]

Rows (each ``llmbatch run`` is a subprocess, its whole command timed; the simulator runs
in its own process, ~0.2 s latency, no rate limit; "server requests" are the
simulator's own count of chat requests for that row):

* ``first run``: N distinct documents, a fresh cache (a SQLite file);
* ``same job, new output``: the same command into a new output file (a new checkpoint),
  the same cache: every answer from the cache;
* ``start-up``: the same command on one record (``--limit 1``), answered from the
  cache: the fixed cost of a run (interpreter, imports, the SDK client), which the
  previous row pays too;
* ``--cache off``: the same again without the cache (everything sent again);
* ``30% duplicates``: N documents of which 30% repeat earlier ones, cache off: the
  job's dedupe alone;
* ``4 procs, one Redis cache``: four ``llmbatch run`` processes over the same N
  documents at once, each its own output, sharing a ``redis://`` cache (a
  ``redis-server`` started for the run): each question is sent by one of them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
from rich.console import Console
from rich.table import Table


@contextmanager
def simulator() -> Iterator[str]:
    args = [sys.executable, "-m", "llmbatch.testing", "--ttft", "0.2", "--no-batch"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield process.stdout.readline().strip()
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def redis(binary: str, folder: Path) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def requests_so_far(url: str) -> int:
    stats = httpx2.get(url.removesuffix("/v1") + "/stats").json()
    return int(stats["requests"])


#: the rate flags of every run: none (the model profile's, gpt-4o-mini's 500 RPM, as a
#: user who passes none gets) or effectively unlimited
PACING: dict[str, tuple[str, ...]] = {
    "profile": (),
    "unlimited": ("--rpm", "1000000", "--tpm", "1000000000"),
}
pacing: tuple[str, ...] = PACING["unlimited"]


def command(url: str, source: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llmbatch",
        "run",
        str(source),
        "-o",
        str(out),
        "--provider",
        url,
        "--prompt",
        "Summarize: {text}",
        "--id-field",
        "id",
        *pacing,
        "-q",
        *extra,
    ]


def timed(*commands: list[str], env: dict[str, str]) -> float:
    """Run *commands* at once; the seconds until the last one ends."""
    started = time.perf_counter()
    running = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in commands]
    for process in running:
        if process.wait() != 0:
            raise SystemExit(f"llmbatch run failed: {process.args!r}")
    return time.perf_counter() - started


def write_docs(path: Path, texts: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "")
    parser.add_argument(
        "--limits",
        choices=sorted(PACING),
        default="unlimited",
        help="profile: no rate flags (gpt-4o-mini's 500 RPM profile: the first run takes "
        "minutes); unlimited: --rpm 1000000 (the default: seconds)",
    )
    args = parser.parse_args()
    global pacing
    pacing = PACING[args.limits]
    n = args.docs
    rows: list[tuple[str, int, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp, simulator() as url:
        root = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        env.update(OPENAI_API_KEY="sk-bench", XDG_CACHE_HOME=str(root / "cache"))
        texts = [f"document number {i}: a paragraph about topic {i % 17}" for i in range(n)]
        distinct = write_docs(root / "distinct.jsonl", texts)
        cache = ("--cache", str(root / "responses.sqlite"))

        def row(name: str, *commands: list[str]) -> None:
            before = requests_so_far(url)
            seconds = timed(*commands, env=env)
            rows.append((name, n, seconds, requests_so_far(url) - before))

        row("first run", command(url, distinct, root / "a.jsonl", *cache))
        row("same job, new output", command(url, distinct, root / "b.jsonl", *cache))
        # the fixed cost of a run (interpreter, imports, SDK client, checkpoint): one
        # record, answered from the cache
        row(
            "start-up: 1 record from the cache",
            command(url, distinct, root / "s.jsonl", *cache, "--limit", "1"),
        )
        row("--cache off", command(url, distinct, root / "c.jsonl", "--cache", "off"))
        dupes = write_docs(root / "dupes.jsonl", [texts[i % int(n * 0.7)] for i in range(n)])
        row("30% duplicates", command(url, dupes, root / "d.jsonl", "--cache", "off"))
        if args.redis_server:
            with redis(args.redis_server, root) as redis_url:
                row(
                    "4 procs, one Redis cache",
                    *(
                        command(url, distinct, root / f"p{i}.jsonl", "--cache", redis_url)
                        for i in range(4)
                    ),
                )
    table = Table(title=f"llmbatch run, {n:,} documents, ~0.2 s latency, {args.limits} limits")
    for column in ("run", "records", "wall s", "server requests", "vs first run"):
        table.add_column(column, justify="left" if column == "run" else "right")
    first = rows[0][2]
    for name, records, seconds, sent in rows:
        records_text = f"{records * 4:,}" if name.startswith("4 procs") else f"{records:,}"
        if name.startswith("start-up"):
            records_text = "1"
        table.add_row(name, records_text, f"{seconds:.1f}", f"{sent:,}", f"{seconds / first:.0%}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
