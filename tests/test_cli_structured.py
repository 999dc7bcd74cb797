"""``llmbatch run --schema``: typed answers from the command line, against the simulator.

As in ``tests/test_cli.py``, the CLI runs in a child process and talks to the simulator
over real HTTP, so the schema crosses the real ``openai`` client (``response_format``
``json_schema``) and comes back as the simulator's JSON, valid for the schema and tagged
with the prompt's ``[content_tag]`` (or spoiled on purpose, to be re-asked). Usage errors
that stop the command before any request run in-process with click's runner.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from llmbatch.cli import cli
from llmbatch.testing import Fault, RequestInfo, Simulator
from llmbatch.testing._content import content_tag
from llmbatch.testing.pytest_plugin import SimulatorFactory
from tests.test_cli import run_args

pytest.importorskip("pydantic")

TEMPLATE = "Summarize: {text}"

#: a JSON Schema file's content: four fields, one of them an enum
SCHEMA: dict[str, Any] = {
    "title": "Reading",
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "topics": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "sentiment": {"enum": ["pos", "neg", "neutral"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["summary", "topics", "sentiment", "score"],
    "additionalProperties": False,
}

#: a module of pydantic models, imported by ``--schema models:Doc``
MODELS = '''
from datetime import date
from typing import Literal

from pydantic import BaseModel, Field, field_validator


class Doc(BaseModel):
    """What a document says."""

    summary: str
    topics: list[str]
    sentiment: Literal["pos", "neg", "neutral"]
    published: date
    pages: int = Field(ge=1, le=500)


class Untagged(BaseModel):
    """A summary that may not start with a tag (the simulator's always do: never valid)."""

    summary: str

    @field_validator("summary")
    @classmethod
    def no_tag(cls, value: str) -> str:
        if value.startswith("["):
            raise ValueError("the summary must not start with a tag")
        return value


NOT_A_MODEL = 42
'''


@dataclass
class Done:
    code: int
    stdout: str
    stderr: str


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.pop("LLMBATCH_TEST_KILL_AT", None)
    env["OPENAI_API_KEY"] = "sk-test"
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


async def llmbatch(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None, seconds: float = 120
) -> Done:
    """Run ``python -m llmbatch ARGS`` in *cwd* to completion."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmbatch",
        *map(str, args),
        cwd=cwd,
        env=env or cli_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), seconds)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


def docs(n: int) -> list[dict[str, str]]:
    return [
        {"id": f"doc-{i:03d}", "text": f"document number {i} about topic {i % 7}"} for i in range(n)
    ]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, records: Sequence[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder with the input, a schema file and a module of models."""
    write_jsonl(tmp_path / "in.jsonl", docs(8))
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "models.py").write_text(MODELS)
    return tmp_path


def tag(item: dict[str, str]) -> str:
    return f"[{content_tag(TEMPLATE.format(**item))}]"


def assert_typed(records: list[dict[str, Any]], inputs: list[dict[str, str]]) -> None:
    """Every line is ok and holds its own record's typed answer under "parsed"."""
    assert ["ok"] * len(inputs) == [r["status"] for r in records]
    assert [d["id"] for d in inputs] == [r["key"] for r in records]
    for record, item in zip(records, inputs, strict=True):
        assert "answer" not in record
        assert record["parsed"]["summary"].startswith(tag(item)), (record, item)


# -- typed answers ---------------------------------------------------------------------


async def test_a_schema_file_gives_a_parsed_answer_per_record(
    simulator: Simulator, workdir: Path
) -> None:
    """``--schema schema.json``: each output line carries its record's answer under
    "parsed", valid for the schema; the requests carried the schema (strict)."""
    out = workdir / "out.jsonl"
    done = await llmbatch(
        *run_args(
            simulator, workdir / "in.jsonl", out, "--schema", "schema.json", "--id-field", "id"
        ),
        cwd=workdir,
    )
    assert 0 == done.code, done.stderr
    records = read_jsonl(out)
    assert_typed(records, docs(8))
    jsonschema = pytest.importorskip("jsonschema")
    for record in records:
        jsonschema.validate(record["parsed"], SCHEMA)
        assert 0 == record["reasks"]
    assert 8 == simulator.stats().structured["answered"]
    assert "re-asks" in done.stderr


async def test_a_pydantic_model_is_imported_from_the_current_folder(
    simulator: Simulator, workdir: Path
) -> None:
    """``--schema models:Doc`` imports the model from the folder the command runs in;
    the answers are dumped as JSON (a date as its ISO string)."""
    out = workdir / "out.jsonl"
    done = await llmbatch(
        *run_args(
            simulator, workdir / "in.jsonl", out, "--schema", "models:Doc", "--id-field", "id"
        ),
        cwd=workdir,
    )
    assert 0 == done.code, done.stderr
    records = read_jsonl(out)
    assert_typed(records, docs(8))
    for record in records:
        parsed = record["parsed"]
        assert ["summary", "topics", "sentiment", "published", "pages"] == list(parsed)
        assert parsed["sentiment"] in ("pos", "neg", "neutral")
        assert 1 <= parsed["pages"] <= 500
        assert isinstance(parsed["published"], str)
        assert 10 == len(parsed["published"])  # YYYY-MM-DD


async def test_invalid_answers_are_reasked_and_counted(
    simulator_factory: SimulatorFactory, workdir: Path
) -> None:
    """With 30% unparseable and 20% schema-breaking answers, every record still ends
    typed; each spoiled answer cost one re-ask, counted per line and in the summary."""
    sim = await simulator_factory(invalid_json=0.3, schema_violations=0.2, seed=3)
    inputs = docs(30)
    source = write_jsonl(workdir / "many.jsonl", inputs)
    out = workdir / "out.jsonl"
    done = await llmbatch(
        *run_args(sim, source, out, "--schema", "schema.json", "--id-field", "id"), cwd=workdir
    )
    assert 0 == done.code, done.stderr
    records = read_jsonl(out)
    assert_typed(records, inputs)
    structured = sim.stats().structured
    spoiled = structured["invalid_json"] + structured["schema_violations"]
    assert spoiled > 5
    assert spoiled == sum(r["reasks"] for r in records)
    assert spoiled == structured["follow_ups"]
    assert f"{spoiled} this run; 0 answers still invalid" in done.stderr


async def test_an_answer_that_stays_invalid_is_an_error_with_its_raw_text(
    simulator_factory: SimulatorFactory, workdir: Path
) -> None:
    """Every answer unparseable, re-asks included: after ``--max-reasks 1`` each record
    is an InvalidOutput error line holding the raw answer and what is wrong; the errors
    file has the same; exit 1."""

    def always_broken(info: RequestInfo) -> Fault:
        return Fault(kind="invalid_json")

    sim = await simulator_factory(script=always_broken)
    inputs = docs(3)
    source = write_jsonl(workdir / "few.jsonl", inputs)
    out, errors = workdir / "out.jsonl", workdir / "errors.jsonl"
    args = ("--schema", "schema.json", "--max-reasks", "1", "--errors", errors)
    done = await llmbatch(*run_args(sim, source, out, *args), cwd=workdir)
    assert 1 == done.code, done.stderr
    records = read_jsonl(out)
    assert ["error"] * 3 == [r["status"] for r in records]
    for record, item in zip(records, inputs, strict=True):
        error = record["error"]
        assert "InvalidOutput" == error["type"]
        assert 1 == error["reasks"]
        assert tag(item) in error["raw"]  # the broken JSON itself
        assert error["errors"]
        with pytest.raises(ValueError):
            json.loads(error["raw"])
    assert records == read_jsonl(errors)
    assert 6 == sim.stats().requests  # one answer and one re-ask per record
    assert "3 answers still invalid" in done.stderr


async def test_max_reasks_zero_sends_no_follow_up(
    simulator_factory: SimulatorFactory, workdir: Path
) -> None:
    """``--max-reasks 0``: a spoiled answer fails its record at once."""
    sim = await simulator_factory(schema_violations=1.0)
    out = workdir / "out.jsonl"
    done = await llmbatch(
        *run_args(sim, workdir / "in.jsonl", out, "--schema", "models:Doc", "--max-reasks", "0"),
        cwd=workdir,
    )
    assert 1 == done.code, done.stderr
    assert {("error", "InvalidOutput", 0)} == {
        (r["status"], r["error"]["type"], r["error"]["reasks"]) for r in read_jsonl(out)
    }
    assert 8 == sim.stats().requests


# -- output formats --------------------------------------------------------------------


async def test_csv_and_parquet_have_a_column_per_field(simulator: Simulator, workdir: Path) -> None:
    """``-o rows.csv`` / ``--output-format parquet``: a column per field of the schema,
    after key/source/status and before the error and usage columns; the failed record
    is a row with its error. A second output of the same checkpoint sends nothing: the
    file is written from the checkpoint."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import csv

    inputs = [*docs(4), {"id": "empty", "text": " "}]
    source = write_jsonl(workdir / "rows.jsonl", inputs)
    common = ("--schema", "schema.json", "--id-field", "id", "--store", workdir / "job.sqlite")
    csv_out = workdir / "rows.csv"
    done = await llmbatch(*run_args(simulator, source, csv_out, *common), cwd=workdir)
    assert 1 == done.code, done.stderr
    columns = ["key", "source", "status", "summary", "topics", "sentiment", "score"]
    columns += ["reasks", "error_type", "error_message", "input_tokens", "output_tokens", "cost"]
    with csv_out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert columns == list(rows[0])
    assert [d["id"] for d in inputs] == [r["key"] for r in rows]
    for row, item in zip(rows[:4], inputs, strict=False):
        assert "ok" == row["status"]
        assert row["summary"].startswith(tag(item))
        assert isinstance(json.loads(row["topics"]), list)
        assert 0 <= float(row["score"]) <= 1
        assert "" == row["error_type"]
    assert ("error", "InvalidInput", "") == (
        rows[4]["status"],
        rows[4]["error_type"],
        rows[4]["summary"],
    )
    assert 4 == simulator.stats().requests

    parquet_out = workdir / "rows.out"
    again = await llmbatch(
        *run_args(simulator, source, parquet_out, *common, "--output-format", "parquet"),
        cwd=workdir,
    )
    assert 1 == again.code, again.stderr
    assert 4 == simulator.stats().requests  # nothing sent again
    table = pq.read_table(parquet_out)
    assert columns == table.column_names
    assert pa.list_(pa.string()) == table.schema.field("topics").type
    assert pa.float64() == table.schema.field("score").type
    assert pa.int64() == table.schema.field("input_tokens").type
    as_rows = table.to_pylist()
    assert [r["summary"] for r in rows[:4]] == [r["summary"] for r in as_rows[:4]]
    assert [json.loads(r["topics"]) for r in rows[:4]] == [r["topics"] for r in as_rows[:4]]
    assert (None, "InvalidInput") == (as_rows[4]["summary"], as_rows[4]["error_type"])


def test_parquet_without_pyarrow_is_a_usage_error(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parquet output without the extra: exit 2 naming what to install, before anything."""
    monkeypatch.chdir(workdir)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    args = ["run", "in.jsonl", "-o", "out.parquet", "--provider", "http://127.0.0.1:9/v1"]
    result = CliRunner().invoke(cli, args)
    assert 2 == result.exit_code, result.output
    assert "llmbatch[parquet]" in result.output
    assert not (workdir / "out.parquet.llmbatch.sqlite").exists()


def test_a_field_named_like_a_column_is_refused_for_tables(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema field called ``status`` cannot be a CSV column beside llmbatch's own:
    a usage error that says so (JSON lines keep it under "parsed")."""
    monkeypatch.chdir(workdir)
    clash = {"type": "object", "properties": {"status": {"type": "string"}}}
    (workdir / "clash.json").write_text(json.dumps(clash))
    args = ["run", "in.jsonl", "-o", "out.csv", "--schema", "clash.json"]
    result = CliRunner().invoke(cli, [*args, "--provider", "http://127.0.0.1:9/v1"])
    assert 2 == result.exit_code, result.output
    assert "field 'status'" in result.output


# -- usage errors, before any request --------------------------------------------------


def invoke(workdir: Path, *args: str) -> Any:
    return CliRunner().invoke(
        cli, ["run", "in.jsonl", "-o", "out.jsonl", "--provider", "http://127.0.0.1:9/v1", *args]
    )


@pytest.fixture
def in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The working folder as the current one; the modules it imports forgotten after."""
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield workdir
    sys.modules.pop("models", None)


def test_schema_and_json_exclude_each_other(in_workdir: Path) -> None:
    """``--schema`` with ``--json``: exit 2, saying why; nothing written."""
    result = invoke(in_workdir, "--schema", "schema.json", "--json")
    assert 2 == result.exit_code
    assert "--schema and --json exclude each other" in result.output
    assert not (in_workdir / "out.jsonl.llmbatch.sqlite").exists()


@pytest.mark.parametrize(
    ("files", "schema", "message"),
    [
        ({}, "missing.json", "missing.json does not exist"),
        ({"bad.json": "{not json"}, "bad.json", "bad.json is not JSON"),
        ({"list.json": "[1, 2]"}, "list.json", "holds a JSON list"),
        ({"bad.json": '{"type": 5}'}, "bad.json", "not a valid JSON Schema"),
        ({"array.json": '{"type": "array"}'}, "array.json", "a JSON object at its root"),
        ({}, "nosuchmodule:Doc", "cannot import 'nosuchmodule': no such module"),
        ({}, "models:Missing", "'models' has no attribute 'Missing'"),
        ({}, "models:NOT_A_MODEL", "models:NOT_A_MODEL: response_model must be"),
        ({"broken.py": "import nosuchdependency\n"}, "broken:Doc", "importing 'broken' failed"),
        ({}, "models:", "is not package.module:Model"),
    ],
)
def test_a_bad_schema_is_a_usage_error(
    in_workdir: Path, files: dict[str, str], schema: str, message: str
) -> None:
    """A schema that cannot be read, imported or used: exit 2 with what is wrong, before
    the checkpoint is created or anything is sent."""
    for name, text in files.items():
        (in_workdir / name).write_text(text)
    result = invoke(in_workdir, "--schema", schema)
    assert 2 == result.exit_code, result.output
    assert "--schema" in result.output
    assert message in " ".join(result.output.split())
    assert not (in_workdir / "out.jsonl.llmbatch.sqlite").exists()
    sys.modules.pop("broken", None)


# -- resuming --------------------------------------------------------------------------


async def test_a_rerun_resumes_without_paying_again(simulator: Simulator, workdir: Path) -> None:
    """A partial run, then the same command: only the rest is sent; a third run sends
    nothing. Another schema is another job, refused until ``--fresh``."""
    source, out = workdir / "in.jsonl", workdir / "out.jsonl"
    args = run_args(simulator, source, out, "--schema", "models:Doc", "--id-field", "id")
    first = await llmbatch(*args, "--limit", "3", cwd=workdir)
    assert 0 == first.code, first.stderr
    assert 3 == simulator.stats().requests
    second = await llmbatch(*args, cwd=workdir)
    assert 0 == second.code, second.stderr
    assert "5 answered now, 3 earlier" in second.stderr
    third = await llmbatch(*args, cwd=workdir)
    assert 0 == third.code, third.stderr
    assert 8 == simulator.stats().requests
    assert_typed(read_jsonl(out), docs(8))
    other = [*args]
    other[other.index("models:Doc")] = "schema.json"
    refused = await llmbatch(*other, cwd=workdir)
    assert 2 == refused.code
    assert "different job" in refused.stderr
    assert "schema" in refused.stderr
    assert 8 == simulator.stats().requests


# -- estimate --------------------------------------------------------------------------


async def test_estimate_counts_the_schema_in_every_request(workdir: Path) -> None:
    """The schema goes with every request: the estimate's input grows by its tokens
    per record, and says so."""
    args = ("estimate", "in.jsonl", "--provider", "openai", "--model", "gpt-4o-mini")
    plain = await llmbatch(*args, "--as-json", cwd=workdir)
    typed = await llmbatch(*args, "--schema", "schema.json", "--as-json", cwd=workdir)
    assert 0 == plain.code, plain.stderr
    assert 0 == typed.code, typed.stderr
    without, with_schema = json.loads(plain.stdout), json.loads(typed.stdout)
    assert 0 == without["schema_tokens"]
    assert with_schema["schema_tokens"] > 50
    added = with_schema["input_tokens"] - without["input_tokens"]
    assert 8 * with_schema["schema_tokens"] == added
    assert with_schema["cost_online"] > without["cost_online"]
    shown = await llmbatch(*args, "--schema", "models:Doc", cwd=workdir)
    assert "the schema adds" in shown.stdout


# -- finish reasons --------------------------------------------------------------------


async def test_a_truncated_answer_fails_or_is_asked_again_with_more_room(
    simulator: Simulator, workdir: Path
) -> None:
    """A typed answer cut at ``--max-tokens`` is an error by default; with
    ``--on-truncated retry-larger`` it is asked once more with twice the room."""
    (workdir / "short.json").write_text(
        json.dumps(
            {"title": "Short", "type": "object", "properties": {"summary": {"type": "string"}}}
        )
    )
    source = workdir / "in.jsonl"
    common = ("--schema", "short.json", "--max-tokens", "8", "--id-field", "id")
    cut = await llmbatch(*run_args(simulator, source, workdir / "cut.jsonl", *common), cwd=workdir)
    assert 1 == cut.code, cut.stderr
    errors = [r["error"] for r in read_jsonl(workdir / "cut.jsonl")]
    assert {"InvalidOutput"} == {e["type"] for e in errors}
    assert all("cut off at max_tokens=8" in e["message"] for e in errors)
    assert 8 == simulator.stats().requests
    larger = await llmbatch(
        *run_args(
            simulator, source, workdir / "larger.jsonl", *common, "--on-truncated", "retry-larger"
        ),
        cwd=workdir,
    )
    assert 0 == larger.code, larger.stderr
    assert_typed(read_jsonl(workdir / "larger.jsonl"), docs(8))
    assert 8 + 16 == simulator.stats().requests


async def test_a_refusal_fails_its_record_unless_kept(
    simulator_factory: SimulatorFactory, workdir: Path
) -> None:
    """The model refuses the first request: by default that record fails as
    ContentFiltered with the refusal; with ``--on-refusal keep`` its text is kept, and
    (not being the object asked for) re-asked into one."""

    def refuse_first(info: RequestInfo) -> Fault | None:
        return Fault(kind="refusal") if info.nth == 1 else None

    common = ("--schema", "schema.json", "--id-field", "id", "--limit", "3", "--concurrency", "1")
    sim = await simulator_factory(script=refuse_first)
    refused = await llmbatch(
        *run_args(sim, workdir / "in.jsonl", workdir / "refused.jsonl", *common), cwd=workdir
    )
    assert 1 == refused.code, refused.stderr
    first, *rest = read_jsonl(workdir / "refused.jsonl")
    assert "ContentFiltered" == first["error"]["type"]
    assert "refused" in first["error"]["message"]
    assert ["ok", "ok"] == [r["status"] for r in rest]
    sim = await simulator_factory(script=refuse_first)
    kept = await llmbatch(
        *run_args(
            sim, workdir / "in.jsonl", workdir / "kept.jsonl", *common, "--on-refusal", "keep"
        ),
        cwd=workdir,
    )
    assert 0 == kept.code, kept.stderr
    first, *rest = read_jsonl(workdir / "kept.jsonl")
    # (the simulator answers a re-ask of an untagged answer from its last user turn:
    # another tag; the point is that the refused record ends typed)
    assert ("ok", 1) == (first["status"], first["reasks"])
    assert {"summary", "topics", "sentiment", "score"} == set(first["parsed"])
    assert_typed(rest, docs(3)[1:])


# -- the Batch API ---------------------------------------------------------------------


def fast_batches(**options: Any) -> Any:
    from llmbatch.testing.simulator import BatchSimConfig

    settings: dict[str, Any] = {
        "validating_seconds": 0.05,
        "seconds_per_request": 0.001,
        "finalizing_seconds": 0.05,
    }
    return BatchSimConfig(**{**settings, **options})


BATCH = ("--mode", "batch", "--poll-interval", "0.05", "--id-field", "id")


async def test_batch_mode_gives_the_same_parsed_rows_at_half_the_price(
    simulator_factory: SimulatorFactory, workdir: Path
) -> None:
    """``--mode batch --schema``: the schema goes into every batch line, and the rows
    are those of an online run, at half the price; nothing goes online."""
    sim = await simulator_factory(batch=fast_batches())
    source = workdir / "in.jsonl"
    online_out, batch_out = workdir / "online.jsonl", workdir / "batch.jsonl"
    # (the same questions twice: without the cache the batch run answers them anew)
    common = ("--schema", "models:Doc", "--id-field", "id", "--cache", "off")
    online = await llmbatch(*run_args(sim, source, online_out, *common), cwd=workdir)
    assert 0 == online.code, online.stderr
    batched = await llmbatch(*run_args(sim, source, batch_out, *common, *BATCH), cwd=workdir)
    assert 0 == batched.code, batched.stderr
    assert 8 == sim.stats().requests  # the online run's only
    online_rows, batch_rows = read_jsonl(online_out), read_jsonl(batch_out)
    assert [r["parsed"] for r in online_rows] == [r["parsed"] for r in batch_rows]
    for a, b in zip(online_rows, batch_rows, strict=True):
        assert b["cost"] == pytest.approx(a["cost"] / 2)


async def test_batch_answers_that_stay_invalid_are_reasked_online_then_errors(
    simulator_factory: SimulatorFactory, workdir: Path
) -> None:
    """A batch answer the model's validator refuses is re-asked online (within the
    limits), and after ``--max-reasks`` it is an InvalidOutput error with its raw text."""
    sim = await simulator_factory(batch=fast_batches())
    out = workdir / "out.jsonl"
    args = ("--schema", "models:Untagged", "--max-reasks", "1", *BATCH)
    done = await llmbatch(*run_args(sim, workdir / "in.jsonl", out, *args), cwd=workdir)
    assert 1 == done.code, done.stderr
    for record, item in zip(read_jsonl(out), docs(8), strict=True):
        assert "InvalidOutput" == record["error"]["type"]
        assert json.loads(record["error"]["raw"])["summary"].startswith(tag(item))
        assert ["summary: Value error, the summary must not start with a tag"] == record["error"][
            "errors"
        ]
    assert 8 == sim.stats().batch["batch_requests_completed"]
    assert 8 == sim.stats().requests  # one online re-ask each
    assert "8 answers still invalid" in done.stderr


def stored_unfinished(store: Path) -> int:
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT response FROM items WHERE status = 'done'").fetchall()
    return sum(json.loads(r[0]).get("finished") is False for r in rows)


async def test_a_crash_between_collecting_and_finishing_loses_nothing_and_pays_once(
    simulator_factory: SimulatorFactory, workdir: Path
) -> None:
    """SIGKILL right after the third batch answer is stored (collected, not validated
    yet): those answers are pending in the checkpoint; the same command finishes them
    from it without a new batch, and every record ends typed, paid once."""
    sim = await simulator_factory(batch=fast_batches())
    out = workdir / "out.jsonl"
    args = run_args(sim, workdir / "in.jsonl", out, "--schema", "models:Doc", *BATCH)
    killed = await llmbatch(*args, cwd=workdir, env=cli_env(LLMBATCH_TEST_KILL_AT="collected:3"))
    assert -9 == killed.code, killed.stderr
    store = workdir / "out.jsonl.llmbatch.sqlite"
    assert 3 == stored_unfinished(store)
    rerun = await llmbatch(*args, cwd=workdir)
    assert 0 == rerun.code, rerun.stderr
    assert 0 == stored_unfinished(store)
    batch = sim.stats().batch
    assert 1 == batch["openai_batches_created"]
    assert 8 == batch["batch_requests_completed"]
    assert 0 == sim.stats().requests  # nothing went online
    assert_typed(read_jsonl(out), docs(8))
    with sqlite3.connect(store) as db:
        ((cost,),) = db.execute("SELECT SUM(cost) FROM items").fetchall()
    assert cost == pytest.approx(sum(r["cost"] for r in read_jsonl(out)))
