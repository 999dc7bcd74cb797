"""The runnable examples work as documented (each runs as a user would run it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from llmbatch.testing import Simulator
from llmbatch.testing._content import content_tag

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_summarize(out: Path, provider: str, docs: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "summarize.py"),
            str(docs),
            "-o",
            str(out),
            "--provider",
            provider,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )


def docs_with_an_empty_one(folder: Path, n: int) -> Path:
    """The first *n* example documents, plus an empty one."""
    folder.mkdir()
    for doc in sorted((EXAMPLES / "docs").glob("*.txt"))[:n]:
        shutil.copy(doc, folder / doc.name)
    (folder / "empty.txt").write_text("")
    return folder


def test_summarize_example_against_the_simulator(tmp_path: Path) -> None:
    """examples/summarize.py writes one record per document: a summary that belongs to
    that document (despite 10% of requests failing), or an error for the empty one."""
    out = tmp_path / "summaries.jsonl"
    docs = docs_with_an_empty_one(tmp_path / "docs", 34)
    done = run_summarize(out, "simulator", docs)
    assert "34 summarized, 1 failed" in done.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(p.name for p in docs.glob("*.txt")) == [r["doc"] for r in records]
    for record in records:
        text = (docs / record["doc"]).read_text()
        if record["doc"] == "empty.txt":
            assert "ValueError" == record["error"]["error_type"]
        else:
            assert record["summary"].startswith(f"[{content_tag(text)}]")


@pytest.mark.local_model
def test_summarize_example_with_the_local_model(tmp_path: Path) -> None:
    """The flow example with no API key: the embedded model summarizes every non-empty
    document, and the empty one is an error record."""
    out = tmp_path / "summaries.jsonl"
    done = run_summarize(out, "auto", docs_with_an_empty_one(tmp_path / "docs", 2))
    assert "via the embedded local model" in done.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert 3 == len(records)
    assert [r["doc"] for r in records if "error" in r] == ["empty.txt"]
    assert all(r["summary"] for r in records if "summary" in r)


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )


def test_pandas_example() -> None:
    """examples/pandas_summarize.py answers every document row (10% 503s retried)."""
    pytest.importorskip("pandas")
    done = run_example("pandas_summarize.py")
    assert "34 of 34 rows answered" in done.stdout


def test_ray_example() -> None:
    """examples/ray_summarize.py: four Ray workers under one RPM, no 429."""
    pytest.importorskip("ray")
    done = run_example("ray_summarize.py")
    assert "34 of 34 documents summarized by 4 workers" in done.stdout
    assert "simulator: 34 requests, 0 429s" in done.stdout


def test_extract_typed_example_against_the_simulator(
    tmp_path: Path, threaded_simulator_factory: Callable[..., Simulator]
) -> None:
    """examples/extract_typed.py against a server URL (the simulator, 20% of its answers
    broken): every document becomes one typed reading of its own text, the broken
    answers cost one re-ask each, and the empty document is an error line."""
    pytest.importorskip("pydantic")
    sim = threaded_simulator_factory(invalid_json=0.2, seed=11)
    docs = docs_with_an_empty_one(tmp_path / "docs", 12)
    out = tmp_path / "readings.jsonl"
    done = run_example("extract_typed.py", str(docs), "-o", str(out), "--provider", sim.base_url)
    broken = sim.stats().structured["invalid_json"]
    assert broken > 0
    assert f"12 read, 1 failed, {broken} re-asks" in done.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(p.name for p in docs.glob("*.txt")) == [r["doc"] for r in records]
    for record in records:
        text = (docs / record["doc"]).read_text()
        if record["doc"] == "empty.txt":
            assert "ValueError" == record["error"]["error_type"]
            continue
        reading = record["reading"]
        prompt = "Read this page of Python's documentation and describe it.\n\n" + text
        assert reading["module"].startswith(f"[{content_tag(prompt)}]")
        assert 1 <= len(reading["topics"]) <= 5
        assert reading["audience"] in ("beginner", "intermediate", "expert")


def test_many_keys_example_against_the_simulator(tmp_path: Path) -> None:
    """examples/many_keys.py: three keys (one revoked mid-run) and a fallback model
    answer every document; each line names the model that answered, and the revoked key
    is retired with one warning that never shows it."""
    out = tmp_path / "many.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_API_KEY")}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "many_keys.py"), "--provider", "simulator", "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    docs = sorted(p.name for p in (EXAMPLES / "docs").glob("*.txt"))
    assert docs == [r["doc"] for r in records]
    assert all("summary" in r for r in records)
    models = {r["model"].split("-20")[0] for r in records}
    assert {"gpt-4o-mini", "gpt-4o"} == models
    assert f"{len(docs)} summarized" in done.stdout
    assert 1 == done.stderr.count("pool.key_retired")
    assert "sk-sim-key-two" not in done.stderr
