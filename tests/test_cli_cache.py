"""``llmbatch run`` with its response cache (on by default, in the user cache folder:
each test has its own, see conftest) and its in-job dedupe, against the simulator."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from llmbatch.testing import Simulator

TEMPLATE = "Summarize: {text}"


@dataclass
class Done:
    code: int
    stderr: str
    stdout: str = ""


async def run(sim: Simulator, source: Path, out: Path, *extra: str, cwd: Path, **env: str) -> Done:
    return await llmbatch("run", sim, source, "-o", str(out), *extra, cwd=cwd, **env)


async def llmbatch(
    command: str, sim: Simulator, source: Path, *extra: str, cwd: Path, **env: str
) -> Done:
    """``llmbatch COMMAND SOURCE ...`` against the simulator (stdout in ``stdout``)."""
    environment = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    environment.update(OPENAI_API_KEY="sk-test", COLUMNS="200", **env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmbatch",
        command,
        str(source),
        "--provider",
        sim.base_url,
        "--prompt",
        TEMPLATE,
        "--id-field",
        "id",
        "--rpm",
        "100000",
        "--tpm",
        "100000000",
        *extra,
        cwd=cwd,
        env=environment,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return Done(proc.returncode, err.decode(), out.decode())


def write_docs(path: Path, texts: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    return path


def answers(path: Path) -> list[str]:
    return [json.loads(line)["answer"] for line in path.read_text().splitlines()]


async def test_the_same_job_into_a_new_output_sends_nothing(
    simulator: Simulator, tmp_path: Path
) -> None:
    """Run twice with a new output file (a new checkpoint): the second run's answers all
    come from the cache, the simulator sees no new request, the outputs agree, and the
    summary says what was saved."""
    source = write_docs(tmp_path / "in.jsonl", [f"document {i}" for i in range(20)])
    first = await run(simulator, source, tmp_path / "a.jsonl", cwd=tmp_path)
    sent = simulator.stats().requests
    second = await run(simulator, source, tmp_path / "b.jsonl", cwd=tmp_path)
    assert (0, 0) == (first.code, second.code), second.stderr
    assert (20, 20) == (sent, simulator.stats().requests)
    assert answers(tmp_path / "a.jsonl") == answers(tmp_path / "b.jsonl")
    assert "20 answers from the cache" in second.stderr


async def test_cache_off_sends_again(simulator: Simulator, tmp_path: Path) -> None:
    source = write_docs(tmp_path / "in.jsonl", [f"document {i}" for i in range(5)])
    await run(simulator, source, tmp_path / "a.jsonl", cwd=tmp_path)
    done = await run(simulator, source, tmp_path / "b.jsonl", "--cache", "off", cwd=tmp_path)
    assert 0 == done.code, done.stderr
    assert 10 == simulator.stats().requests


async def test_the_environment_names_the_cache(simulator: Simulator, tmp_path: Path) -> None:
    """``LLMBATCH_CACHE=PATH``: that file, not the default folder, holds the answers."""
    source = write_docs(tmp_path / "in.jsonl", [f"document {i}" for i in range(3)])
    path = tmp_path / "shared.sqlite"
    await run(simulator, source, tmp_path / "a.jsonl", cwd=tmp_path, LLMBATCH_CACHE=str(path))
    assert path.exists()
    await run(simulator, source, tmp_path / "b.jsonl", cwd=tmp_path, LLMBATCH_CACHE=str(path))
    assert 3 == simulator.stats().requests


async def test_duplicate_records_are_sent_once(simulator: Simulator, tmp_path: Path) -> None:
    """30 of 100 records repeat earlier ones: 70 requests, every record answered with
    its text's answer."""
    texts = [f"document {i % 70}" for i in range(100)]
    source = write_docs(tmp_path / "in.jsonl", texts)
    done = await run(simulator, source, tmp_path / "a.jsonl", "--cache", "off", cwd=tmp_path)
    assert 0 == done.code, done.stderr
    assert 70 == simulator.stats().requests
    got = answers(tmp_path / "a.jsonl")
    assert all(got[i] == got[i % 70] for i in range(100))


async def test_two_processes_share_a_redis_cache(
    simulator: Simulator, tmp_path: Path, redis_url: str
) -> None:
    """``--cache redis://...``: another job (another process, another checkpoint) is
    served from the answers the first stored."""
    source = write_docs(tmp_path / "in.jsonl", [f"redis document {i}" for i in range(6)])
    for out in ("a.jsonl", "b.jsonl"):
        done = await run(simulator, source, tmp_path / out, "--cache", redis_url, cwd=tmp_path)
        assert 0 == done.code, done.stderr
    assert 6 == simulator.stats().requests


async def test_a_bad_cache_is_a_usage_error(simulator: Simulator, tmp_path: Path) -> None:
    source = write_docs(tmp_path / "in.jsonl", ["x"])
    done = await run(simulator, source, tmp_path / "a.jsonl", "--cache", "ftp://x", cwd=tmp_path)
    assert 2 == done.code
    assert "--cache" in done.stderr
    assert 0 == simulator.stats().requests


async def test_batch_mode_uses_the_cache_too(simulator: Simulator, tmp_path: Path) -> None:
    """Through the Batch API: the first job's batch answers are cached; the second job
    (another output) submits no batch and sends nothing online."""
    source = write_docs(tmp_path / "in.jsonl", [f"batch document {i}" for i in range(6)])
    options = ("--mode", "batch", "--poll-interval", "0.05")
    first = await run(simulator, source, tmp_path / "a.jsonl", *options, cwd=tmp_path)
    created = simulator.stats().batch["openai_batches_created"]
    second = await run(simulator, source, tmp_path / "b.jsonl", *options, cwd=tmp_path)
    assert (0, 0) == (first.code, second.code), second.stderr
    assert (1, 1) == (created, simulator.stats().batch["openai_batches_created"])
    assert 0 == simulator.stats().requests
    assert answers(tmp_path / "a.jsonl") == answers(tmp_path / "b.jsonl")


async def test_estimate_counts_what_the_cache_and_the_dedupe_leave_unsent(
    simulator: Simulator, tmp_path: Path
) -> None:
    """After a run over 20 documents, an estimate over those 20, 3 repeats of new
    documents and 5 new ones: 20 from the cache (with what they cost), 3 duplicates, 5
    to send, and only those 5 in the tokens; the estimate itself sends nothing."""
    first = write_docs(tmp_path / "in.jsonl", [f"document {i}" for i in range(20)])
    assert 0 == (await run(simulator, first, tmp_path / "a.jsonl", cwd=tmp_path)).code
    texts = [f"document {i}" for i in range(20)] + [f"new {i % 5}" for i in range(8)]
    second = write_docs(tmp_path / "more.jsonl", texts)
    done = await llmbatch("estimate", simulator, second, "--as-json", cwd=tmp_path)
    assert 0 == done.code, done.stderr
    found = json.loads(done.stdout)
    assert (28, 20, 3, 5) == (
        found["records"],
        found["from_cache"],
        found["duplicates"],
        found["to_send"],
    )
    assert found["saved_cost"] > 0
    alone = await llmbatch(
        "estimate", simulator, second, "--as-json", "--cache", "off", cwd=tmp_path
    )
    unsent = json.loads(alone.stdout)
    assert (0, 3, 25) == (unsent["from_cache"], unsent["duplicates"], unsent["to_send"])
    assert found["input_tokens"] < unsent["input_tokens"]
    assert 20 == simulator.stats().requests


async def test_the_config_file_names_the_cache_and_the_options_win(
    simulator: Simulator, tmp_path: Path
) -> None:
    """``[cache] location`` in llmbatch.toml holds the answers; ``mode = "read-only"``
    stores nothing; ``--cache-mode read-write`` on the command line wins over it."""
    path = tmp_path / "configured.sqlite"
    (tmp_path / "llmbatch.toml").write_text(
        f'[cache]\nlocation = "{path.as_posix()}"\nmode = "read-only"\n'
    )
    source = write_docs(tmp_path / "in.jsonl", [f"configured {i}" for i in range(4)])
    await run(simulator, source, tmp_path / "a.jsonl", cwd=tmp_path)
    await run(simulator, source, tmp_path / "b.jsonl", cwd=tmp_path)
    assert 8 == simulator.stats().requests  # read-only: nothing was stored
    done = await run(
        simulator, source, tmp_path / "c.jsonl", "--cache-mode", "read-write", cwd=tmp_path
    )
    assert 0 == done.code, done.stderr
    await run(simulator, source, tmp_path / "d.jsonl", cwd=tmp_path)
    assert 12 == simulator.stats().requests  # d.jsonl was served from the file
    assert path.exists()


async def test_the_live_view_shows_cache_hits_duplicates_and_no_phantom_retries(
    tmp_path: Path,
) -> None:
    """A job of 6 records (4 distinct) over a cache holding 2 of them: the live view's
    numbers say 2 from the cache, 2 duplicates and what they saved, and the answers that
    took no attempt do not hide a retry (one scripted transient error: 1 retry)."""
    from rich.console import Console

    from llmbatch.cache import MemoryCache
    from llmbatch.cli.run import _live_view, _snapshot
    from llmbatch.client import LLMClient
    from llmbatch.config import ModelProfile
    from llmbatch.errors import ProviderUnavailable
    from llmbatch.job import JobProgress, JobSpec, run_job
    from llmbatch.limits import Limits
    from llmbatch.models import Request
    from llmbatch.providers.fake import FakeProvider

    failed_once: list[str] = []

    def answer(request: Request) -> str:
        text = str(request.messages[-1]["content"])
        if text.endswith("doc 3") and not failed_once:
            failed_once.append(text)
            raise ProviderUnavailable("overloaded", provider="fake")
        return text.upper()

    prices = {"fake/m": ModelProfile(provider="fake", model="m", input_price=1e3, output_price=1e3)}
    cache = MemoryCache()
    texts = ["doc 0", "doc 1", "doc 2", "doc 3", "doc 2", "doc 3"]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def make(output: str) -> tuple[JobSpec, LLMClient]:
        spec = JobSpec(input=source, output=tmp_path / output, template="{text}", model="m")
        client = LLMClient(
            FakeProvider(answer),
            model="m",
            profiles=prices,
            limits=Limits(rpm=100_000),
            cache=cache,
            dedupe=True,
            sleep=lambda _: asyncio.sleep(0),
        )
        return spec, client

    first_spec = JobSpec(
        input=write_docs(tmp_path / "first.jsonl", ["doc 0", "doc 1"]),
        output=tmp_path / "first.out.jsonl",
        template="{text}",
        model="m",
    )
    _, first = make("unused.jsonl")
    await run_job(first_spec, first)
    await first.aclose()

    spec, client = make("out.jsonl")
    progress = JobProgress(total=6)
    await run_job(spec, client, progress=progress)
    snapshot = _snapshot(progress, client, "m")
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(_live_view(progress, client, "m"))
    await client.aclose()
    shown = console.export_text()
    assert (2, 2, 1) == (snapshot["cache_hits"], snapshot["duplicates"], snapshot["retries"])
    assert snapshot["saved_cost"] > 0
    assert "2 from the cache" in shown
    assert "2 duplicates" in shown
