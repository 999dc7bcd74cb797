"""The runnable examples work as documented (each runs as a user would run it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llmbatch.testing._content import content_tag

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_summarize_example_offline(tmp_path: Path) -> None:
    """examples/summarize.py writes one record per document: a summary that belongs to
    that document, or an error for the empty one."""
    out = tmp_path / "summaries.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "summarize.py"), "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "11 summarized, 1 failed" in done.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    docs = sorted(p.name for p in (EXAMPLES / "docs").glob("*.txt"))
    assert docs == [r["doc"] for r in records]
    for record in records:
        text = (EXAMPLES / "docs" / record["doc"]).read_text()
        if record["doc"] == "empty.txt":
            assert "ValueError" == record["error"]["error_type"]
        else:
            assert record["summary"].startswith(f"[{content_tag(text)}]")
