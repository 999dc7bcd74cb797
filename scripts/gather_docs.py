"""Regenerate ``examples/docs/``: the module docstrings of Python's standard library.

    python scripts/gather_docs.py

Real prose that nobody on this project wrote and that ships freely (Python Software
Foundation License): one ``.txt`` file per module, its docstring cut at a paragraph
boundary after about 1,500 characters so that every document fits the embedded
model's context window. Run with the Python the examples were gathered with (3.11)
to reproduce the files exactly.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

MODULES = [
    "argparse",
    "ast",
    "calendar",
    "collections",
    "copy",
    "csv",
    "difflib",
    "gettext",
    "heapq",
    "itertools",
    "json",
    "lzma",
    "mimetypes",
    "operator",
    "optparse",
    "pickle",
    "pprint",
    "random",
    "re",
    "sched",
    "shelve",
    "smtplib",
    "socketserver",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tempfile",
    "timeit",
    "tokenize",
    "trace",
    "typing",
    "unittest",
    "uuid",
]
MAX_CHARS = 1500
DOCS = Path(__file__).resolve().parent.parent / "examples" / "docs"


def excerpt(text: str, limit: int = MAX_CHARS) -> str:
    """*text* up to the last paragraph that ends before *limit* (at least one)."""
    kept: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        if kept and size + len(paragraph) > limit:
            break
        kept.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(kept).strip() + "\n"


def main() -> int:
    DOCS.mkdir(parents=True, exist_ok=True)
    for old in DOCS.glob("*.txt"):
        old.unlink()
    for name in MODULES:
        doc = inspect.getdoc(importlib.import_module(name)) or ""
        (DOCS / f"{name}.txt").write_text(excerpt(doc), encoding="utf-8")
    print(f"wrote {len(MODULES)} documents to {DOCS} (Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
