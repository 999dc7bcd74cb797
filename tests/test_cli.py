"""``llmbatch`` as a user runs it: a subprocess, talking to the simulator over real HTTP.

The simulator runs in the test's event loop while the CLI runs in a child process, so
every request crosses a real socket through the real ``openai`` client. Crash tests
SIGKILL the child at chosen points (``LLMBATCH_TEST_KILL_AT``) and at random moments,
rerun the same command, and check that every input record ends in the output exactly
once and that nothing finished was paid for twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmbatch.testing import FakeClock, Simulator
from llmbatch.testing._content import content_tag
from llmbatch.testing._faults import Fault, RequestInfo
from llmbatch.testing.pytest_plugin import SimulatorFactory

EXAMPLES = Path(__file__).parent.parent / "examples"
CANARY = "sk-proj-CANARYcanary0123456789abcdefghijklmnopqrstu9876"
TEMPLATE = "Summarize: {text}"


@dataclass
class Done:
    code: int
    stdout: str
    stderr: str


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.pop("LLMBATCH_TEST_KILL_AT", None)
    env["OPENAI_API_KEY"] = CANARY
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


async def start_llmbatch(
    *args: str | Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    stdin: int = asyncio.subprocess.DEVNULL,
    stdout: int = asyncio.subprocess.PIPE,
    stderr: int = asyncio.subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """Start ``python -m llmbatch ARGS`` (for tests that signal, kill or watch it)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmbatch",
        *map(str, args),
        cwd=cwd,
        env=env or cli_env(),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
    )


async def llmbatch(
    *args: str | Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    seconds: float = 120,
) -> Done:
    """Run ``python -m llmbatch ARGS`` to completion."""
    proc = await start_llmbatch(
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(
        proc.communicate(stdin.encode() if stdin is not None else None), seconds
    )
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


def run_args(sim: Simulator, source: Path | str, out: Path, *extra: str | Path) -> list[str | Path]:
    return [
        "run",
        source,
        "-o",
        out,
        "--provider",
        sim.base_url,
        "--prompt",
        TEMPLATE,
        "--rpm",
        "100000",
        "--tpm",
        "100000000",
        *extra,
    ]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, records: Sequence[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def docs(n: int) -> list[dict[str, str]]:
    return [
        {"id": f"doc-{i:03d}", "text": f"document number {i} about topic {i % 7}"} for i in range(n)
    ]


def assert_answers(records: list[dict[str, Any]], inputs: list[dict[str, str]]) -> None:
    """Each output line answers its own input (the simulator tags answers by prompt)."""
    assert [r["status"] for r in records] == ["ok"] * len(inputs)
    for record, item in zip(records, inputs, strict=True):
        tag = content_tag(TEMPLATE.format(**item))
        assert record["answer"].startswith(f"[{tag}]"), (record, item)


# -- input formats ---------------------------------------------------------------------


async def test_jsonl_input_gives_one_answer_per_record_in_order(
    simulator: Simulator, tmp_path: Path
) -> None:
    """A JSONL file: every record answered, in input order, with usage and cost; exit 0."""
    inputs = docs(20)
    out = tmp_path / "out.jsonl"
    done = await llmbatch(
        *run_args(simulator, write_jsonl(tmp_path / "in.jsonl", inputs), out), cwd=tmp_path
    )
    assert 0 == done.code, done.stderr
    records = read_jsonl(out)
    assert_answers(records, inputs)
    assert [f"in.jsonl:{i}" for i in range(1, 21)] == [r["source"] for r in records]
    assert all(r["usage"]["input_tokens"] > 0 and r["cost"] > 0 for r in records)
    assert 20 == simulator.stats().ok


async def test_csv_input(simulator: Simulator, tmp_path: Path) -> None:
    """A CSV file with a header: the columns are the template's fields."""
    inputs = docs(5)
    lines = ["id,text"] + [f"{d['id']},{d['text']}" for d in inputs]
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    done = await llmbatch(
        *run_args(simulator, tmp_path / "in.csv", out, "--id-field", "id"), cwd=tmp_path
    )
    assert 0 == done.code, done.stderr
    records = read_jsonl(out)
    assert_answers(records, inputs)
    assert [d["id"] for d in inputs] == [r["key"] for r in records]
    assert "in.csv:2" == records[0]["source"]


async def test_parquet_input(simulator: Simulator, tmp_path: Path) -> None:
    """A Parquet file (the ``parquet`` extra)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    inputs = docs(6)
    pq.write_table(pa.Table.from_pylist(inputs), tmp_path / "in.parquet")
    out = tmp_path / "out.jsonl"
    done = await llmbatch(*run_args(simulator, tmp_path / "in.parquet", out), cwd=tmp_path)
    assert 0 == done.code, done.stderr
    assert_answers(read_jsonl(out), inputs)


async def test_folder_input(simulator: Simulator, tmp_path: Path) -> None:
    """A folder of text files: one document each, keyed by file name, in name order."""
    folder = tmp_path / "docs"
    folder.mkdir()
    inputs = docs(4)
    for d in inputs:
        (folder / f"{d['id']}.txt").write_text(d["text"])
    out = tmp_path / "out.jsonl"
    done = await llmbatch(*run_args(simulator, folder, out), cwd=tmp_path)
    assert 0 == done.code, done.stderr
    records = read_jsonl(out)
    assert_answers(records, inputs)
    assert [f"{d['id']}.txt" for d in inputs] == [r["key"] for r in records]


async def test_stdin_input(simulator: Simulator, tmp_path: Path) -> None:
    """``-`` reads JSON lines from standard input."""
    inputs = docs(3)
    out = tmp_path / "out.jsonl"
    stdin = "".join(json.dumps(d) + "\n" for d in inputs)
    done = await llmbatch(*run_args(simulator, "-", out), cwd=tmp_path, stdin=stdin)
    assert 0 == done.code, done.stderr
    records = read_jsonl(out)
    assert_answers(records, inputs)
    assert "stdin:1" == records[0]["source"]


async def test_json_mode_keeps_the_answer_parsed(simulator: Simulator, tmp_path: Path) -> None:
    """``--json`` asks for a JSON object, and the output line holds it as JSON."""
    inputs = docs(2)
    out = tmp_path / "out.jsonl"
    done = await llmbatch(
        *run_args(simulator, write_jsonl(tmp_path / "in.jsonl", inputs), out, "--json"),
        cwd=tmp_path,
    )
    assert 0 == done.code, done.stderr
    answers = [r["answer"] for r in read_jsonl(out)]
    assert [content_tag(TEMPLATE.format(**d)) for d in inputs] == [a["tag"] for a in answers]


# -- bad input -------------------------------------------------------------------------


async def test_bad_records_fail_alone_with_their_line_number(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """A malformed line, a missing template field, an empty document and one over the
    context window each become an error line naming where they are; the others are
    answered; the exit code is 1."""
    sim = await simulator_factory(context_window=400)
    lines = [
        json.dumps({"text": "first fine document"}),
        '{"text": "broken',
        json.dumps({"body": "no text field here"}),
        json.dumps({"text": "   "}),
        json.dumps({"text": "word " * 3000}),
        json.dumps({"text": "last fine document"}),
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    errors = tmp_path / "errors.jsonl"
    done = await llmbatch(*run_args(sim, source, out, "--errors", errors), cwd=tmp_path)
    assert 1 == done.code, done.stderr
    records = read_jsonl(out)
    assert ["ok", "error", "error", "error", "error", "ok"] == [r["status"] for r in records]
    assert [f"in.jsonl:{i}" for i in range(1, 7)] == [r["source"] for r in records]
    messages = {r["source"]: r["error"]["message"] for r in records if r["status"] == "error"}
    assert "line 2: not valid JSON" in messages["in.jsonl:2"]
    assert "in.jsonl:3" in messages["in.jsonl:3"]
    assert "'text'" in messages["in.jsonl:3"]
    assert "empty" in messages["in.jsonl:4"]
    assert "ContextLengthExceeded" == records[4]["error"]["type"]
    assert "in.jsonl:5" in messages["in.jsonl:5"]
    assert [r for r in records if r["status"] == "error"] == read_jsonl(errors)
    assert 2 == sim.stats().ok  # the unusable records were never sent


async def test_skip_leaves_failed_records_out_of_the_output(
    simulator: Simulator, tmp_path: Path
) -> None:
    """``--on-error skip``: the output holds only answers; the errors file has the rest."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "fine"}\nnot json\n')
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    done = await llmbatch(
        *run_args(simulator, source, out, "--on-error", "skip", "--errors", errors), cwd=tmp_path
    )
    assert 1 == done.code
    assert ["ok"] == [r["status"] for r in read_jsonl(out)]
    assert ["in.jsonl:2"] == [r["source"] for r in read_jsonl(errors)]


async def test_unknown_input_format_is_a_usage_error(tmp_path: Path) -> None:
    """An input whose format cannot be told exits 2 with a message, calling nothing."""
    (tmp_path / "in.xml").write_text("<a/>")
    done = await llmbatch(
        "run", "in.xml", "-o", "out.jsonl", "--provider", "http://127.0.0.1:9/v1", cwd=tmp_path
    )
    assert 2 == done.code
    assert "cannot tell the format" in done.stderr


# -- exit codes, fatal errors, budget, fail-fast -------------------------------------


async def test_a_rejected_key_aborts_the_run_with_exit_2(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """A fatal error (the key is refused) stops the run; nothing is lost: every record
    is in the output as pending, and the key never appears anywhere."""
    sim = await simulator_factory(api_keys=["sk-the-right-key-000000000000"])
    source = write_jsonl(tmp_path / "in.jsonl", docs(10))
    out = tmp_path / "out.jsonl"
    log = tmp_path / "log.jsonl"
    done = await llmbatch(*run_args(sim, source, out, "--log-json", log), cwd=tmp_path)
    assert 2 == done.code, done.stderr
    assert "AuthenticationFailed" in done.stderr
    statuses = [r["status"] for r in read_jsonl(out)]
    assert 10 == len(statuses)
    assert {"pending", "error"} >= set(statuses)
    assert_no_canary(tmp_path, done)


async def test_fail_fast_aborts_at_the_first_failure(simulator: Simulator, tmp_path: Path) -> None:
    """``--on-error fail-fast``: the first failed record aborts the run (exit 2)."""
    source = tmp_path / "in.jsonl"
    source.write_text("not json\n" + "".join(json.dumps(d) + "\n" for d in docs(3)))
    out = tmp_path / "out.jsonl"
    done = await llmbatch(
        *run_args(simulator, source, out, "--on-error", "fail-fast", "--concurrency", "1"),
        cwd=tmp_path,
    )
    assert 2 == done.code
    assert "aborted" in done.stderr
    assert "error" == read_jsonl(out)[0]["status"]


async def test_the_budget_stops_the_job_and_counts_earlier_runs(
    simulator: Simulator, tmp_path: Path
) -> None:
    """``--max-cost`` is the job's budget: once spent (earlier runs included), no new
    record starts; the run exits 2 and the unstarted records stay pending."""
    source = write_jsonl(tmp_path / "in.jsonl", docs(30))
    out = tmp_path / "out.jsonl"
    first = await llmbatch(*run_args(simulator, source, out, "--limit", "10"), cwd=tmp_path)
    assert 0 == first.code
    spent = sum(r["cost"] for r in read_jsonl(out))
    second = await llmbatch(
        *run_args(simulator, source, out, "--max-cost", f"{spent:.10f}", "--concurrency", "1"),
        cwd=tmp_path,
    )
    assert 2 == second.code, second.stderr
    assert "BudgetExhausted" in second.stderr
    assert 10 == simulator.stats().ok  # the budget was already spent: nothing sent
    assert 20 == sum(r["status"] == "pending" for r in read_jsonl(out))


# -- resume, fingerprints, retry-failed ------------------------------------------------


async def test_rerun_sends_only_what_is_missing(simulator: Simulator, tmp_path: Path) -> None:
    """The same command after a partial run sends only the records not answered yet, and
    a third run sends nothing."""
    inputs = docs(25)
    source = write_jsonl(tmp_path / "in.jsonl", inputs)
    out = tmp_path / "out.jsonl"
    first = await llmbatch(*run_args(simulator, source, out, "--limit", "10"), cwd=tmp_path)
    assert 0 == first.code
    assert 10 == len(read_jsonl(out))
    second = await llmbatch(*run_args(simulator, source, out), cwd=tmp_path)
    assert 0 == second.code, second.stderr
    assert "15 answered now, 10 earlier" in second.stderr
    assert 25 == simulator.stats().ok
    third = await llmbatch(*run_args(simulator, source, out), cwd=tmp_path)
    assert 0 == third.code
    assert 25 == simulator.stats().ok
    assert_answers(read_jsonl(out), inputs)
    assert 0 == simulator.stats().duplicates


async def test_a_changed_prompt_is_refused_until_fresh(
    simulator: Simulator, tmp_path: Path
) -> None:
    """Another prompt against the same checkpoint is refused (exit 2, nothing sent);
    ``--fresh`` starts over."""
    source = write_jsonl(tmp_path / "in.jsonl", docs(3))
    out = tmp_path / "out.jsonl"
    assert 0 == (await llmbatch(*run_args(simulator, source, out), cwd=tmp_path)).code
    changed = [*run_args(simulator, source, out)]
    changed[changed.index(TEMPLATE)] = "Translate: {text}"
    refused = await llmbatch(*changed, cwd=tmp_path)
    assert 2 == refused.code
    assert "different job" in refused.stderr
    assert "template" in refused.stderr
    assert 3 == simulator.stats().ok
    fresh = await llmbatch(*changed, "--fresh", cwd=tmp_path)
    assert 0 == fresh.code, fresh.stderr
    assert 6 == simulator.stats().ok


async def test_a_changed_record_is_answered_again(simulator: Simulator, tmp_path: Path) -> None:
    """A record whose content changed under the same id is sent again, not served stale."""
    inputs = docs(3)
    source = write_jsonl(tmp_path / "in.jsonl", inputs)
    out = tmp_path / "out.jsonl"
    args = run_args(simulator, source, out, "--id-field", "id")
    assert 0 == (await llmbatch(*args, cwd=tmp_path)).code
    inputs[1] = {"id": inputs[1]["id"], "text": "a rewritten document"}
    write_jsonl(source, inputs)
    again = await llmbatch(*args, cwd=tmp_path)
    assert 0 == again.code
    assert 4 == simulator.stats().ok
    assert_answers(read_jsonl(out), inputs)


async def test_failed_records_are_retried_only_when_asked(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """A record that failed stays failed on rerun; ``--retry-failed`` sends it again."""
    sim = await simulator_factory(context_window=100)
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "short"}, {"text": "long " * 500}])
    out = tmp_path / "out.jsonl"
    args = run_args(sim, source, out, "--max-tokens", "20")
    assert 1 == (await llmbatch(*args, cwd=tmp_path)).code
    assert ["ok", "error"] == [r["status"] for r in read_jsonl(out)]
    assert 2 == sim.stats().requests
    assert 1 == (await llmbatch(*args, cwd=tmp_path)).code
    assert 2 == sim.stats().requests
    retried = await llmbatch(*args, "--retry-failed", cwd=tmp_path)
    assert 1 == retried.code
    assert 3 == sim.stats().requests


# -- crashes and interruptions ---------------------------------------------------------


def stored_count(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1) as db:
            return int(db.execute("SELECT COUNT(*) FROM items").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


async def kill_when_stored(proc: asyncio.subprocess.Process, store: Path, count: int) -> None:
    while proc.returncode is None and stored_count(store) < count:  # noqa: ASYNC110 - another process's state: nothing to wait on
        await asyncio.sleep(0.005)
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
    await proc.wait()


KILL_POINTS = [
    "item:1",  # right after the first record is stored
    "item:23",  # mid-run, with requests in flight
    "item:40",  # the last record stored, before the output is written
    "output:0",  # the output file opened, nothing written
    "output:17",  # in the middle of writing the output
    "rename:0",  # the output written, not yet renamed into place
]


@pytest.mark.parametrize("point", [*KILL_POINTS, "random:1", "random:2", "random:3"])
async def test_kill_minus_9_then_rerun_loses_nothing_and_pays_once(
    simulator_factory: SimulatorFactory, tmp_path: Path, point: str
) -> None:
    """SIGKILL at a point of the run, then the same command: the output has every
    record exactly once, and only requests in flight at the kill were answered twice."""
    sim = await simulator_factory(ttft=0.01, jitter=0.01, seed=3)
    inputs = docs(40)
    source = write_jsonl(tmp_path / "in.jsonl", inputs)
    out = tmp_path / "out.jsonl"
    out.write_text("a previous output\n")
    args = [*run_args(sim, source, out, "--concurrency", "4", "--id-field", "id")]
    if point.startswith("random"):
        rng = random.Random(point)
        proc = await start_llmbatch(
            *args,
            cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.wait_for(
            kill_when_stored(proc, tmp_path / "out.jsonl.llmbatch.sqlite", rng.randint(1, 39)), 60
        )
        assert -signal.SIGKILL == proc.returncode
    else:
        killed = await llmbatch(*args, cwd=tmp_path, env=cli_env(LLMBATCH_TEST_KILL_AT=point))
        assert -signal.SIGKILL == killed.code, killed.stderr
    # The output is the old file or a whole new one, never a torn one.
    old = out.read_text()
    assert old == "a previous output\n" or len(read_jsonl(out)) == 40
    rerun = await llmbatch(*args, cwd=tmp_path)
    assert 0 == rerun.code, rerun.stderr
    records = read_jsonl(out)
    assert [d["id"] for d in inputs] == [r["key"] for r in records]
    assert_answers(records, inputs)
    stats = sim.stats()
    assert stats.duplicates <= 4  # at most the requests in flight at the kill
    if point.startswith(("output", "rename", "item:40")):
        assert 0 == stats.duplicates  # everything was stored before the kill
    assert not (tmp_path / "out.jsonl.partial").exists()


async def test_ctrl_c_stops_at_once_keeps_what_finished_and_exits_130(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """SIGINT while requests hang: the run stops without waiting for them, writes the
    output (finished records answered, the rest pending) and exits 130; the same
    command then finishes the job."""
    sim = await simulator_factory(script=[])
    inputs = docs(12)
    source = write_jsonl(tmp_path / "in.jsonl", inputs)
    out = tmp_path / "out.jsonl"
    args = run_args(sim, source, out, "--concurrency", "2", "--id-field", "id")
    # First, 4 records answered quickly; then every request hangs for an hour.
    first = await llmbatch(*args, "--limit", "4", cwd=tmp_path)
    assert 0 == first.code
    hanging = await simulator_factory(hang=1.0, hang_seconds=3600)
    hang_args = run_args(hanging, source, out, "--concurrency", "2", "--id-field", "id")
    proc = await start_llmbatch(*hang_args, cwd=tmp_path)
    while hanging.stats().in_flight < 2:  # noqa: ASYNC110 - the child's requests: no event
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 5)
    assert 130 == proc.returncode, err.decode()
    assert "interrupted" in err.decode()
    records = read_jsonl(out)
    assert ["ok"] * 4 + ["pending"] * 8 == [r["status"] for r in records]
    done = await llmbatch(*args, cwd=tmp_path)
    assert 0 == done.code
    assert_answers(read_jsonl(out), inputs)


# -- quotas shared through Redis -------------------------------------------------------


@pytest.mark.redis
async def test_two_runs_share_one_quota_through_redis(
    simulator_factory: SimulatorFactory,
    redis_password_url: str,
    redis_password: str,
    tmp_path: Path,
) -> None:
    """Two ``llmbatch run`` processes at once, one given ``--limiter-url``, the other
    ``LLMBATCH_LIMITER_URL``, against a server allowing 120 requests a minute: their 130
    records share one quota in Redis and go without a single 429, every record answered;
    the Redis password never shows in a log, the output or the checkpoint."""
    sim = await simulator_factory(rpm=120)
    inputs = docs(130)
    namespace = f"cli-{os.getpid()}-{random.randrange(10**9)}"
    env = cli_env(LLMBATCH_LIMITER_NAMESPACE=namespace)
    runs = []
    for name, chunk, extra, more_env in (
        ("a", inputs[:65], ["--limiter-url", redis_password_url], {}),
        ("b", inputs[65:], [], {"LLMBATCH_LIMITER_URL": redis_password_url}),
    ):
        source = write_jsonl(tmp_path / f"{name}.jsonl", chunk)
        args: list[str | Path] = [
            "run",
            source,
            "-o",
            tmp_path / f"{name}.out.jsonl",
            "--provider",
            sim.base_url,
            "--prompt",
            TEMPLATE,
            "--rpm",
            "120",
            "--log-json",
            tmp_path / f"{name}.log.jsonl",
            *extra,
        ]
        runs.append(llmbatch(*args, cwd=tmp_path, env={**env, **more_env}))
    first, second = await asyncio.gather(*runs)
    assert (0, 0) == (first.code, second.code), first.stderr + second.stderr
    assert_answers(read_jsonl(tmp_path / "a.out.jsonl"), inputs[:65])
    assert_answers(read_jsonl(tmp_path / "b.out.jsonl"), inputs[65:])
    stats = sim.stats()
    assert ({}, 130) == (dict(stats.rate_limited), stats.requests)
    logged = [json.loads(line) for line in (tmp_path / "a.log.jsonl").read_text().splitlines()]
    config = next(e for e in logged if e["event"] == "run.config")
    assert config["quotas"] == redis_password_url.replace(redis_password, "***")
    assert_no_canary(tmp_path, first, second, secret=redis_password)


@pytest.mark.parametrize("url", ["http://cache:6379", "127.0.0.1:6379"])
async def test_an_unusable_limiter_url_is_refused_before_anything_is_sent(
    simulator: Simulator, tmp_path: Path, url: str
) -> None:
    """A --limiter-url that is not redis://, rediss:// or unix:// is a usage error
    (exit 2) naming the option; no request reaches the server."""
    source = write_jsonl(tmp_path / "in.jsonl", docs(3))
    done = await llmbatch(
        *run_args(simulator, source, tmp_path / "out.jsonl", "--limiter-url", url), cwd=tmp_path
    )
    assert 2 == done.code
    assert "--limiter-url" in done.stderr
    assert "unsupported limiter URL" in done.stderr
    assert 0 == simulator.stats().requests


# -- secrets ---------------------------------------------------------------------------


def assert_no_canary(folder: Path, *runs: Done, secret: str = CANARY) -> None:
    """*secret* (the canary API key) is in no run's output and no file under *folder*."""
    for run in runs:
        assert secret not in run.stdout + run.stderr
    for path in folder.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


async def test_the_api_key_never_reaches_logs_store_or_output(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """With the key accepted and with errors on the way (503s retried, a bad record),
    the key appears in no log line, JSON log, checkpoint, output or errors file."""
    sim = await simulator_factory(api_keys=[CANARY], errors={503: 0.3}, seed=5)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in docs(15)) + "oops\n")
    out = tmp_path / "out.jsonl"
    run = await llmbatch(
        *run_args(
            sim,
            source,
            out,
            "--log-json",
            tmp_path / "log.jsonl",
            "--errors",
            tmp_path / "e.jsonl",
            "-v",
        ),
        cwd=tmp_path,
    )
    assert 1 == run.code, run.stderr
    assert 15 == sum(r["status"] == "ok" for r in read_jsonl(out))
    status = await llmbatch("status", out, "--errors", cwd=tmp_path)
    assert_no_canary(tmp_path, run, status)


# -- observability ---------------------------------------------------------------------


async def test_progress_lines_and_json_log_when_not_a_terminal(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """Without a terminal the run logs progress lines; ``--log-json`` gets the same
    events as JSON objects; the summary table ends stderr."""
    sim = await simulator_factory(ttft=0.05)
    source = write_jsonl(tmp_path / "in.jsonl", docs(30))
    out, log = tmp_path / "out.jsonl", tmp_path / "log.jsonl"
    run = await llmbatch(
        *run_args(
            sim, source, out, "--concurrency", "2", "--progress-interval", "0.2", "--log-json", log
        ),
        cwd=tmp_path,
    )
    assert 0 == run.code
    events = [json.loads(line) for line in log.read_text().splitlines()]
    names = [e["event"] for e in events]
    assert "run.config" in names
    assert "job.start" in names
    progress = [e for e in events if e["event"] == "run.progress"]
    assert progress, names
    keys = {"finished", "total", "rpm", "tpm", "rate_limited", "others_rpm", "cost", "eta_seconds"}
    assert keys <= set(progress[-1])
    assert (30, 0.0) == (progress[-1]["total"], progress[-1]["others_rpm"])  # alone on the key
    assert "run.progress" in run.stderr
    assert "llmbatch run" in run.stderr
    assert "checkpoint" in run.stderr


# -- estimate, status, limits, serve-sim -----------------------------------------------


async def test_estimate_counts_tokens_cost_and_time_without_calling(
    simulator: Simulator, tmp_path: Path
) -> None:
    """``estimate`` counts records, tokens, cost both ways and time at the limits, and
    knows what an earlier run already answered; it sends nothing."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in docs(12)) + "bad\n")
    args: list[str | Path] = [
        "estimate",
        source,
        "--model",
        "gpt-4o-mini",
        "--provider",
        "openai",
        "--rpm",
        "6",
        "--prompt",
        TEMPLATE,
        "--as-json",
    ]
    done = await llmbatch(*args, "--max-tokens", "100", cwd=tmp_path)
    assert 0 == done.code, done.stderr
    estimate = json.loads(done.stdout)
    assert 13 == estimate["records"]
    assert 1 == estimate["invalid"]
    assert 12 == estimate["to_send"]
    assert 1200 == estimate["max_output_tokens"]
    assert estimate["input_tokens"] > 12 * 5
    assert estimate["cost_batch"] == pytest.approx(estimate["cost_online"] / 2)
    assert "rpm" == estimate["binding_limit"]
    assert 2.0 == estimate["minutes_at_limits"]
    assert "o200k_base" == estimate["encoding"]
    out = tmp_path / "out.jsonl"
    ran = await llmbatch(
        *run_args(simulator, source, out, "--limit", "5", "--max-tokens", "100"), cwd=tmp_path
    )
    assert 0 == ran.code
    later = await llmbatch(*args, "--max-tokens", "100", "-o", out, cwd=tmp_path)
    assert 5 == json.loads(later.stdout)["already_done"]
    assert 5 == simulator.stats().ok


async def test_dry_run_shows_the_first_request_and_sends_nothing(
    simulator: Simulator, tmp_path: Path
) -> None:
    """``run --dry-run`` prints the estimate and the first rendered prompt."""
    source = write_jsonl(tmp_path / "in.jsonl", docs(3))
    done = await llmbatch(
        *run_args(simulator, source, tmp_path / "out.jsonl", "--dry-run"), cwd=tmp_path
    )
    assert 0 == done.code, done.stderr
    assert "user: Summarize: document number 0 about topic 0" in done.stdout
    assert 0 == simulator.stats().requests
    assert not (tmp_path / "out.jsonl").exists()


async def test_status_reports_the_checkpoint(simulator: Simulator, tmp_path: Path) -> None:
    """``status`` reads a run's checkpoint: counts, tokens, cost, and its errors."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in docs(4)) + "{broken\n")
    out = tmp_path / "out.jsonl"
    assert 1 == (await llmbatch(*run_args(simulator, source, out), cwd=tmp_path)).code
    done = await llmbatch("status", out, "--errors", "--as-json", cwd=tmp_path)
    assert 0 == done.code, done.stderr
    report = json.loads(done.stdout)
    assert (4, 0, 1) == (report["done"], report["failed"], report["invalid"])
    assert "gpt-4o-mini" == report["job"]["model"]
    assert ["in.jsonl:5"] == [e["source"] for e in report["errors"]]
    table = await llmbatch("status", out, cwd=tmp_path)
    assert "done" in table.stdout
    assert "4" in table.stdout


async def test_limits_prints_what_the_headers_say(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """``limits`` makes one call and reports the provider's limits from its headers."""
    sim = await simulator_factory(rpm=321, tpm=45_000)
    done = await llmbatch("limits", "--provider", sim.base_url, "--as-json", cwd=tmp_path)
    assert 0 == done.code, done.stderr
    report = json.loads(done.stdout)
    assert {"rpm": 321, "tpm": 45_000} == report["limits"]
    assert 320 == report["remaining"]["rpm"]
    assert 1 == sim.stats().requests


async def test_serve_sim_is_a_subcommand(tmp_path: Path) -> None:
    """``llmbatch serve-sim`` starts the simulator and prints its base URL first."""
    proc = await start_llmbatch("serve-sim", "--port", "0", "--rpm", "60", cwd=tmp_path)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.wait(), 30)
    assert line.decode().startswith("http://127.0.0.1:")
    assert line.decode().strip().endswith("/v1")


# -- the embedded default --------------------------------------------------------------


@pytest.mark.local_model
async def test_readme_main_job_on_the_embedded_model(tmp_path: Path) -> None:
    """The README's first command, on a few documents: with no API key the local model
    answers, and the run says so in one line."""
    env = cli_env()
    env.pop("OPENAI_API_KEY")
    out = tmp_path / "summaries.jsonl"
    done = await llmbatch(
        "run",
        EXAMPLES / "docs",
        "-o",
        out,
        "--limit",
        "3",
        "--max-tokens",
        "48",
        cwd=tmp_path,
        env=env,
        seconds=600,
    )
    assert 0 == done.code, done.stderr
    assert 1 == done.stderr.count("using the embedded local model")
    records = read_jsonl(out)
    assert ["argparse.txt", "ast.txt", "calendar.txt"] == [r["key"] for r in records]
    assert all(r["status"] == "ok" and r["answer"].strip() for r in records)


async def test_live_display_on_a_terminal(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """On a terminal (rich's ``TTY_COMPATIBLE=1``) the run draws a live view of records,
    rates against the limits, 429s and spend, read on the event loop without errors."""
    sim = await simulator_factory(ttft=0.1)
    source = write_jsonl(tmp_path / "in.jsonl", docs(16))
    out = tmp_path / "out.jsonl"
    run = await llmbatch(
        *run_args(sim, source, out, "--concurrency", "2"),
        cwd=tmp_path,
        env=cli_env(TTY_COMPATIBLE="1"),
    )
    assert 0 == run.code, run.stderr
    assert "Traceback" not in run.stderr
    assert "records" in run.stderr
    assert "/100000 req/min" in run.stderr
    assert "429s" in run.stderr


# -- the Batch API ---------------------------------------------------------------------


def fast_batches(**options: Any) -> Any:
    from llmbatch.testing.simulator import BatchSimConfig

    settings: dict[str, Any] = {
        "validating_seconds": 0.05,
        "seconds_per_request": 0.001,
        "finalizing_seconds": 0.05,
    }
    return BatchSimConfig(**{**settings, **options})


async def test_batch_mode_gives_the_same_output_at_half_the_price(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """``--mode batch`` answers through the Batch API: the same output lines, the cost
    at the batch discount, failed requests as error lines; nothing goes online."""
    sim = await simulator_factory(batch=fast_batches(fail_custom_ids=frozenset({"doc-003"})))
    inputs = docs(30)
    source = write_jsonl(tmp_path / "in.jsonl", inputs)
    online_out, batch_out = tmp_path / "online.jsonl", tmp_path / "batch.jsonl"
    # (the same questions twice: without the cache the batch run answers them anew)
    common = ("--id-field", "id", "--max-tokens", "40", "--cache", "off")
    assert 1 != (await llmbatch(*run_args(sim, source, online_out, *common), cwd=tmp_path)).code
    online_ok = sim.stats().ok
    run = await llmbatch(
        *run_args(sim, source, batch_out, *common, "--mode", "batch", "--poll-interval", "0.05"),
        cwd=tmp_path,
    )
    assert 1 == run.code, run.stderr
    assert online_ok == sim.stats().ok  # nothing went online
    online, batched = read_jsonl(online_out), read_jsonl(batch_out)
    assert [r["key"] for r in online] == [r["key"] for r in batched]
    for a, b in zip(online, batched, strict=True):
        if b["key"] == "doc-003":
            assert "error" == b["status"]
            continue
        assert a["answer"] == b["answer"]
        assert b["cost"] == pytest.approx(a["cost"] / 2)
    status = json.loads((await llmbatch("status", batch_out, "--as-json", cwd=tmp_path)).stdout)
    assert 0 == status["batches"]["submitted"]
    assert status["batches"]["collected"] >= 1


async def test_auto_mode_chooses_and_says_why(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """``--mode auto --prefer cost`` takes the Batch API for a big enough job, and
    stays online for a small one; the choice is logged with the saving."""
    sim = await simulator_factory(batch=fast_batches())
    source = write_jsonl(tmp_path / "in.jsonl", docs(120))
    # (the small job asks again what the big one asked: without the cache)
    auto = ("--mode", "auto", "--prefer", "cost", "--poll-interval", "0.05", "--max-tokens", "20")
    uncached = ("--cache", "off")
    big = await llmbatch(
        *run_args(sim, source, tmp_path / "big.jsonl", *auto, *uncached), cwd=tmp_path
    )
    assert 0 == big.code, big.stderr
    assert "routing.choice" in big.stderr
    assert "mode=batch" in big.stderr
    assert 0 == sim.stats().ok
    small = await llmbatch(
        *run_args(sim, source, tmp_path / "small.jsonl", *auto, *uncached, "--limit", "10"),
        cwd=tmp_path,
    )
    assert 0 == small.code
    assert "mode=online" in small.stderr
    assert 10 == sim.stats().ok


async def test_kill_after_batch_submission_resumes_polling(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """SIGKILL once the batches are submitted; the same command resumes polling them:
    the simulator shows only the original batches, and every record is answered."""
    sim = await simulator_factory(batch=fast_batches(validating_seconds=1.5))
    inputs = docs(40)
    source = write_jsonl(tmp_path / "in.jsonl", inputs)
    out = tmp_path / "out.jsonl"
    args = run_args(
        sim, source, out, "--id-field", "id", "--mode", "batch", "--poll-interval", "0.1"
    )
    proc = await start_llmbatch(
        *args,
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    while sim.stats().batch["openai_batches_created"] < 1:  # noqa: ASYNC110 - the child's requests
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the journal is committed before any polling
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    rerun = await llmbatch(*args, cwd=tmp_path)
    assert 0 == rerun.code, rerun.stderr
    assert "batch.resumed" in rerun.stderr
    assert 1 == sim.stats().batch["openai_batches_created"]
    assert 40 == sim.stats().batch["batch_requests_completed"]
    assert_answers(read_jsonl(out), inputs)


async def test_ctrl_c_leaves_batches_running_and_says_how_to_resume_or_cancel(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """Ctrl-C during a batch run exits 130 and leaves the batch at the provider;
    ``llmbatch batch cancel`` stops it."""
    sim = await simulator_factory(batch=fast_batches(validating_seconds=30))
    source = write_jsonl(tmp_path / "in.jsonl", docs(5))
    out = tmp_path / "out.jsonl"
    args = run_args(sim, source, out, "--mode", "batch", "--poll-interval", "0.1")
    proc = await start_llmbatch(
        *args,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    while sim.stats().batch["openai_batches_created"] < 1:  # noqa: ASYNC110 - the child's requests
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert 130 == proc.returncode
    assert "batches keep running at the provider" in err.decode()
    cancel = await llmbatch("batch", "cancel", out, "--provider", sim.base_url, cwd=tmp_path)
    assert 0 == cancel.code, cancel.stderr
    assert "cancelled 1 batches" in cancel.stdout
    assert 1 == sim.stats().batch["batches_cancel_requested"]


def batches_journaled(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1) as db:
            return int(db.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


async def test_batch_cancel_then_the_same_command_keeps_what_ran_and_pays_once(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """``llmbatch run --mode batch`` is stopped with Ctrl-C while its batch of 10 runs;
    ``llmbatch batch cancel`` stops the batch once 4 had run (doc-003 of them failing
    with a 400). The same command again collects the cancelled batch and submits only
    the 6 it never ran: the simulator answered each record once, and the output has
    every record exactly once (9 answers, doc-003's error). A third run sends nothing.
    The batches run on a fake clock that the test moves."""
    clock = FakeClock(start=1_700_000_000.0)
    sim = await simulator_factory(
        batch=fast_batches(
            validating_seconds=1.0,
            seconds_per_request=1.0,
            finalizing_seconds=1.0,
            cancel_seconds=1.0,
            fail_custom_ids=frozenset({"doc-003"}),
            failure_status_code=400,
        ),
        batch_clock=clock.time,
    )
    inputs = docs(10)
    source = write_jsonl(tmp_path / "in.jsonl", inputs)
    out = tmp_path / "out.jsonl"
    args = run_args(
        sim, source, out, "--id-field", "id", "--mode", "batch", "--poll-interval", "0.05"
    )
    first = await start_llmbatch(
        *args,
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    store = tmp_path / "out.jsonl.llmbatch.sqlite"
    while batches_journaled(store) < 1 and first.returncode is None:  # noqa: ASYNC110 - another process's state
        await asyncio.sleep(0.01)
    first.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(first.communicate(), 30)
    assert 130 == first.returncode, err.decode()

    clock.advance(1.0 + 4.5)  # doc-000 .. doc-003 have run
    cancel = await llmbatch("batch", "cancel", out, "--provider", sim.base_url, cwd=tmp_path)
    assert 0 == cancel.code, cancel.stderr
    assert "cancelled 1 batches" in cancel.stdout
    clock.advance(1.0)  # the provider has ended it

    rerun = asyncio.ensure_future(llmbatch(*args, cwd=tmp_path))
    while sim.stats().batch["openai_batches_created"] < 2 and not rerun.done():  # noqa: ASYNC110 - the child's requests
        await asyncio.sleep(0.01)
    clock.advance(3_600.0)  # the resubmission runs to its end
    second = await rerun
    assert 1 == second.code, second.stderr  # one record failed
    written = read_jsonl(out)
    third = await llmbatch(*args, cwd=tmp_path)
    assert 1 == third.code, third.stderr

    stats = sim.stats().batch
    assert (2, 1, 9, 1, 6) == (
        stats["openai_batches_created"],
        stats["batches_cancel_requested"],
        stats["batch_requests_completed"],
        stats["batch_requests_failed"],
        stats["batch_requests_canceled"],
    )
    assert "collecting what it ran before the cancel" in second.stderr
    assert written == read_jsonl(out)
    assert [d["id"] for d in inputs] == [r["key"] for r in written]
    failed = [r for r in written if r["status"] != "ok"]
    assert [("doc-003", "error", "BadRequest")] == [
        (r["key"], r["status"], r["error"]["type"]) for r in failed
    ]
    assert_answers(
        [r for r in written if r["key"] != "doc-003"],
        [d for d in inputs if d["id"] != "doc-003"],
    )


# -- never lose the user's data, nor answers already paid for --------------------------


def dead_port() -> int:
    """A 127.0.0.1 port where nothing listens (bound, read, closed)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    "clash",
    [
        ["-o", "in.jsonl"],
        ["-o", "./sub/../in.jsonl"],
        ["-o", "link.jsonl"],
        ["-o", "out.jsonl", "--errors", "in.jsonl"],
        ["-o", "out.jsonl", "--store", "in.jsonl"],
        ["-o", "out.jsonl", "--errors", "out.jsonl"],
    ],
)
async def test_a_path_that_would_overwrite_the_input_is_refused(
    simulator: Simulator, tmp_path: Path, clash: list[str]
) -> None:
    """The output, errors file or checkpoint naming the input file (however spelled,
    a symlink included) is a usage error, exit 2, before anything is written or sent:
    the input is untouched, byte for byte."""
    source = write_jsonl(tmp_path / "in.jsonl", docs(5))
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(source)
    before = source.read_bytes()
    args = ["run", "in.jsonl", "--provider", simulator.base_url, "--prompt", TEMPLATE, *clash]
    done = await llmbatch(*args, cwd=tmp_path)
    assert 2 == done.code, done.stderr
    assert "same file" in done.stderr or "is the input file" in done.stderr
    assert before == source.read_bytes()
    assert 0 == simulator.stats().requests
    assert not (tmp_path / "in.jsonl.llmbatch.sqlite").exists()


async def test_an_output_inside_the_input_folder_is_refused(
    simulator: Simulator, tmp_path: Path
) -> None:
    """A folder input with the output inside it: a rerun would read the output as a
    document. Exit 2, nothing written."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha")
    done = await llmbatch(
        "run", "docs", "-o", "docs/out.jsonl", "--provider", simulator.base_url, cwd=tmp_path
    )
    assert 2 == done.code
    assert "inside the input folder" in done.stderr
    assert ["a.txt"] == sorted(p.name for p in folder.iterdir())


async def test_a_fatal_stop_keeps_every_answer_the_provider_accepted(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """The quota runs out after 30 accepted requests while 20 are in flight. The run
    stops (exit 2) but waits for the requests already accepted: the 30 answers are all
    in the output, the rest is pending (not failed). Once the quota is back, the same
    command sends only the 70 never answered: no answer is paid for twice."""
    quota = {"left": 30}

    def metered(info: RequestInfo) -> Fault | None:
        if quota["left"] <= 0:
            return Fault(status=429, error_type="insufficient_quota")
        quota["left"] -= 1
        return None

    sim = await simulator_factory(ttft=0.4, jitter=0.5, seed=5, script=metered)
    inputs = docs(100)
    source = write_jsonl(tmp_path / "in.jsonl", inputs)
    out = tmp_path / "out.jsonl"
    args = run_args(sim, source, out, "--concurrency", "20", "--id-field", "id")
    first = await llmbatch(*args, cwd=tmp_path)
    assert 2 == first.code, first.stderr
    assert "QuotaExhausted" in first.stderr
    statuses = [r["status"] for r in read_jsonl(out)]
    assert (30, 70) == (statuses.count("ok"), statuses.count("pending"))
    assert 30 == sim.stats().ok
    quota["left"] = 1000
    second = await llmbatch(*args, cwd=tmp_path)
    assert 0 == second.code, second.stderr
    assert_answers(read_jsonl(out), inputs)
    stats = sim.stats()
    assert (100, 0) == (stats.ok, stats.duplicates)


async def test_a_dead_provider_stops_the_run_at_once_and_the_rerun_continues(
    simulator: Simulator, tmp_path: Path
) -> None:
    """``--provider`` names a port with nothing listening: one clear message, exit 2,
    every record left pending (not failed) after a handful of attempts; the plain
    rerun against a live server answers them all."""
    inputs = docs(50)
    source = write_jsonl(tmp_path / "in.jsonl", inputs)
    out = tmp_path / "out.jsonl"
    dead = f"http://127.0.0.1:{dead_port()}/v1"
    args: list[str | Path] = ["run", source, "-o", out, "--prompt", TEMPLATE, "--id-field", "id"]
    first = await llmbatch(
        *args, "--provider", dead, "--concurrency", "4", cwd=tmp_path, seconds=60
    )
    assert 2 == first.code, first.stderr
    assert "cannot reach the provider" in first.stderr
    assert ["pending"] * 50 == [r["status"] for r in read_jsonl(out)]
    found = re.search(r"(\d+) records started, (\d+) requests sent", first.stderr)
    assert found is not None, first.stderr
    assert int(found.group(2)) < 60  # 4 at a time, a few attempts each: not 50 x 6
    second = await llmbatch(*args, "--provider", simulator.base_url, cwd=tmp_path)
    assert 0 == second.code, second.stderr
    assert_answers(read_jsonl(out), inputs)
    assert "50 answered now" in second.stderr


async def test_an_unreachable_redis_limiter_stops_before_any_request(
    simulator: Simulator, tmp_path: Path
) -> None:
    """``--limiter-url`` naming a Redis server that is not there: a clear fatal error
    naming the limiter (exit 2) before any request; nothing marked failed."""
    source = write_jsonl(tmp_path / "in.jsonl", docs(20))
    out = tmp_path / "out.jsonl"
    url = f"redis://:s3cret-pass@127.0.0.1:{dead_port()}/0"
    done = await llmbatch(*run_args(simulator, source, out, "--limiter-url", url), cwd=tmp_path)
    assert 2 == done.code, done.stderr
    assert "limiter" in done.stderr
    assert "s3cret-pass" not in done.stderr
    assert 0 == simulator.stats().requests
    assert not out.exists() or {"pending"} == {r["status"] for r in read_jsonl(out)}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("Summarize: {txt}", "the field {txt}"),
        ("Summarize: {text", "malformed"),
        ("Summarize: {text} }", "malformed"),
        ("Summarize: {}", "positional field"),
    ],
)
async def test_a_template_error_is_one_usage_error(
    simulator: Simulator, tmp_path: Path, template: str, expected: str
) -> None:
    """A template naming a field no record has, or a malformed one, is one usage
    error (exit 2) naming the problem and the fields there are, before any request."""
    source = write_jsonl(tmp_path / "in.jsonl", docs(50))
    out = tmp_path / "out.jsonl"
    done = await llmbatch(
        "run",
        source,
        "-o",
        out,
        "--provider",
        simulator.base_url,
        "--prompt",
        template,
        cwd=tmp_path,
    )
    assert 2 == done.code, done.stderr
    assert expected in done.stderr
    if "{txt}" in expected:
        assert "did you mean {text}" in done.stderr
        assert "id, text" in done.stderr
    assert 0 == simulator.stats().requests
    assert not out.exists()


async def test_status_and_batch_list_read_the_checkpoint_of_a_run_killed_early(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """Killed before the output file was ever written, a run has only its
    checkpoint: ``status OUT`` and ``batch list OUT`` read it all the same."""
    sim = await simulator_factory(ttft=0.01)
    source = write_jsonl(tmp_path / "in.jsonl", docs(10))
    out = tmp_path / "out.jsonl"
    env = cli_env(LLMBATCH_TEST_KILL_AT="item:3")
    killed = await llmbatch(
        *run_args(sim, source, out, "--concurrency", "1"), cwd=tmp_path, env=env
    )
    assert -signal.SIGKILL == killed.code
    assert not out.exists()
    status = await llmbatch("status", out, "--as-json", cwd=tmp_path)
    assert 0 == status.code, status.stderr
    assert 3 == json.loads(status.stdout)["done"]
    listed = await llmbatch("batch", "list", out, cwd=tmp_path)
    assert 0 == listed.code, listed.stderr
    missing = await llmbatch("status", tmp_path / "other.jsonl", cwd=tmp_path)
    assert 2 == missing.code
    assert "no checkpoint" in missing.stderr


async def test_a_rerun_tells_earlier_failures_from_new_answers(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """The summary of a rerun says what was answered now, what earlier, and which
    failures from earlier runs were not sent again (and how to send them)."""
    sim = await simulator_factory(context_window=100)
    records = [{"text": "short"}, {"text": "long " * 500}, {"text": "brief"}]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    args = run_args(sim, source, out, "--max-tokens", "20", "--limit", "2")
    first = await llmbatch(*args, cwd=tmp_path)
    assert 1 == first.code
    second = await llmbatch(*run_args(sim, source, out, "--max-tokens", "20"), cwd=tmp_path)
    assert 1 == second.code
    assert "1 answered now, 1 earlier" in second.stderr
    assert "1 earlier: rerun with --retry-failed" in second.stderr


async def test_folder_input_says_which_files_it_skipped(
    simulator: Simulator, tmp_path: Path
) -> None:
    """Files a folder input cannot use are named in the log, not skipped silently."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha")
    (folder / "chart.png").write_bytes(b"\x89PNG\r\n")
    (folder / "blob.bin").write_bytes(b"\x00\x01")
    out = tmp_path / "out.jsonl"
    done = await llmbatch(
        *run_args(simulator, folder, out),
        "-v",
        cwd=tmp_path,
    )
    assert 0 == done.code, done.stderr
    assert "skipped" in done.stderr
    assert "chart.png" in done.stderr
    assert 1 == len(read_jsonl(out))


async def test_timeout_bounds_each_attempt(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """``--timeout``: a request the server holds is abandoned after that many seconds
    and retried, instead of holding its slot for the SDK's 600 s."""
    sim = await simulator_factory(script=[Fault(kind="hang", nth=1)], hang_seconds=3600)
    source = write_jsonl(tmp_path / "in.jsonl", docs(3))
    out = tmp_path / "out.jsonl"
    done = await llmbatch(
        *run_args(sim, source, out, "--timeout", "0.5", "--concurrency", "1"),
        cwd=tmp_path,
        seconds=60,
    )
    assert 0 == done.code, done.stderr
    assert 4 == sim.stats().requests
    assert "timeout=0.5" in done.stderr


async def test_too_large_prompts_fail_alone_without_retries(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """A record whose prompt exceeds the key's TPM gets OpenAI's 429 "Request too
    large": that record's permanent error after one request (not six, each pausing
    the whole quota). A record longer than the model's context window (gpt-4o-mini:
    128,000 tokens) fails before any request. The others are answered."""
    sim = await simulator_factory(tpm=20_000, context_window=10_000_000)
    records = [
        {"id": "small", "text": "a short document"},
        {"id": "over-tpm", "text": "word " * 30_000},
        {"id": "over-window", "text": "word " * 140_000},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    done = await llmbatch(
        "run",
        source,
        "-o",
        out,
        "--provider",
        sim.base_url,
        "--prompt",
        TEMPLATE,
        "--id-field",
        "id",
        "--rpm",
        "1000",
        "--tpm",
        "100000000",
        "--max-tokens",
        "16",
        cwd=tmp_path,
        seconds=60,
    )
    assert 1 == done.code, done.stderr
    lines = {r["key"]: r for r in read_jsonl(out)}
    assert "ok" == lines["small"]["status"]
    assert "RequestTooLarge" == lines["over-tpm"]["error"]["type"]
    assert 1 == lines["over-tpm"]["error"]["attempts"]
    assert "ContextLengthExceeded" == lines["over-window"]["error"]["type"]
    assert "context window of 128,000" in lines["over-window"]["error"]["message"]
    assert 2 == sim.stats().requests


async def test_the_budget_is_never_exceeded_with_requests_in_flight(
    simulator: Simulator, tmp_path: Path
) -> None:
    """``--max-cost`` with many requests allowed at once: each reserves what it may
    cost at most while it runs, so the job stops before the budget, never after
    (exit 2, the rest pending), however many are in flight."""
    source = write_jsonl(tmp_path / "in.jsonl", docs(60))
    out = tmp_path / "out.jsonl"
    budget = 0.0005  # gpt-4o-mini: ~$0.00016 a request at most with --max-tokens 256
    done = await llmbatch(
        *run_args(simulator, source, out, "--max-cost", str(budget), "--concurrency", "64"),
        cwd=tmp_path,
    )
    assert 2 == done.code, done.stderr
    assert "BudgetExhausted" in done.stderr
    lines = read_jsonl(out)
    spent = sum(r.get("cost") or 0.0 for r in lines)
    assert 0 < spent <= budget
    assert {"ok", "pending"} == {r["status"] for r in lines}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "S: {text.upper}"], "reads an attribute"),
        (["--log-json", "in.jsonl"], "is the input file"),
    ],
)
async def test_what_would_resend_or_damage_the_input_forever_is_refused(
    simulator: Simulator, tmp_path: Path, extra: list[str], message: str
) -> None:
    """A template reading an attribute (its prompt would carry a memory address, so
    no answer would ever match it again) and a JSON log appended to the input are
    usage errors: exit 2, the input untouched, nothing sent."""
    source = write_jsonl(tmp_path / "in.jsonl", docs(5))
    before = source.read_bytes()
    args = ["run", "in.jsonl", "-o", "out.jsonl", "--provider", simulator.base_url, *extra]
    done = await llmbatch(*args, cwd=tmp_path)
    assert 2 == done.code, done.stderr
    assert message in done.stderr
    assert before == source.read_bytes()
    assert 0 == simulator.stats().requests


async def test_a_template_error_on_stdin_is_one_usage_error(
    simulator: Simulator, tmp_path: Path
) -> None:
    """stdin is read once, then the template is checked: one error, exit 2, nothing
    sent and nothing stored as failed."""
    lines = "".join(json.dumps(d) + "\n" for d in docs(30))
    done = await llmbatch(
        "run",
        "-",
        "-o",
        "out.jsonl",
        "--provider",
        simulator.base_url,
        "--prompt",
        "S: {txt}",
        cwd=tmp_path,
        stdin=lines,
    )
    assert 2 == done.code, done.stderr
    assert "did you mean {text}" in done.stderr
    assert 0 == simulator.stats().requests


async def test_a_provider_answering_only_errors_stops_the_run(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """Every request answered 503: once an item has used all its attempts with not one
    request answered meanwhile, the run stops (exit 2) with the records pending, not
    failed, so the rerun sends them when the server works again."""
    sim = await simulator_factory(errors={503: 1.0})
    source = write_jsonl(tmp_path / "in.jsonl", docs(20))
    out = tmp_path / "out.jsonl"
    done = await llmbatch(
        *run_args(sim, source, out, "--concurrency", "4"), cwd=tmp_path, seconds=90
    )
    assert 2 == done.code, done.stderr
    assert "answered nothing but errors" in done.stderr
    assert {"pending"} == {r["status"] for r in read_jsonl(out)}


async def test_estimate_without_a_key_prices_the_named_model(tmp_path: Path) -> None:
    """An estimate calls nothing, so it needs no key: ``--model gpt-4o-mini`` with no
    key set is estimated at OpenAI's prices (the model's profile), not as the local
    model at an unknown cost."""
    write_jsonl(tmp_path / "in.jsonl", docs(10))
    env = {k: v for k, v in cli_env().items() if not k.endswith("_API_KEY")}
    done = await llmbatch(
        "estimate", "in.jsonl", "--model", "gpt-4o-mini", "--as-json", cwd=tmp_path, env=env
    )
    assert 0 == done.code, done.stderr
    report = json.loads(done.stdout)
    assert report["cost_online"] is not None
    assert report["cost_batch"] == pytest.approx(report["cost_online"] / 2)
