"""Extract typed fields from a folder of documents: a pydantic model in, one row out per document.

    python examples/extract_typed.py [DOCS_DIR] [-o readings.jsonl] [--provider auto]

One ``llmbatch.map`` call with ``response_model=Reading``: every provider gets the schema
the way it enforces best (OpenAI strict ``json_schema``, Anthropic a forced tool, the
local model a grammar), each answer is validated into a ``Reading``, and an invalid one is
asked again with what is wrong with it (``max_reasks``). The output has one JSON line per
document: ``{"doc", "reading": {...}}``, or ``{"doc", "error"}`` (an empty document, or an
answer still invalid after the re-asks, with its raw text).

Providers (``--provider``):

* ``auto`` (default): OpenAI when ``OPENAI_API_KEY`` is set, otherwise the local model;
* ``openai``: OpenAI (``OPENAI_API_KEY``);
* ``local``: SmolLM2-135M-Instruct in this process (the ``local`` extra; no API key);
* ``simulator``: llmbatch's provider simulator on 127.0.0.1, 10% of its answers broken
  so that re-asks show;
* a URL: any OpenAI-compatible server (``http://127.0.0.1:8000/v1``, ``llmbatch
  serve-sim``...), with ``OPENAI_API_KEY`` if it wants one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

import llmbatch
from llmbatch import ItemError
from llmbatch.limits import Limits
from llmbatch.providers.base import Provider

HERE = Path(__file__).parent
PROMPT = "Read this page of Python's documentation and describe it.\n\n{text}"


class Reading(BaseModel):
    """What a documentation page is about."""

    module: str = Field(description="the module the page documents")
    summary: str = Field(description="what the module is for, in one sentence")
    topics: list[str] = Field(description="its key topics", min_length=1, max_length=5)
    audience: Literal["beginner", "intermediate", "expert"]


class ShortReading(Reading):
    """The same, with bounded strings, for the small local model: its grammar enforces
    the bounds, so it cannot ramble past ``max_tokens`` and leave the JSON unfinished."""

    module: str = Field(description="the module the page documents", max_length=40)
    summary: str = Field(description="what the module is for, in one sentence", max_length=200)
    topics: list[Annotated[str, Field(max_length=40)]] = Field(
        description="its key topics", min_length=1, max_length=5
    )


async def open_provider(choice: str, stack: AsyncExitStack) -> tuple[Provider, str, str]:
    """``(provider, model, where)`` for the --provider choice."""
    from llmbatch.providers.openai import OpenAIProvider

    if choice == "auto":
        choice = "openai" if os.environ.get("OPENAI_API_KEY") else "local"
    if choice == "openai":
        return OpenAIProvider(), os.environ.get("LLMBATCH_MODEL", "gpt-4o-mini"), "OpenAI"
    if choice == "local":
        from llmbatch.providers.local import DEFAULT_MODEL, LocalProvider

        return LocalProvider(), DEFAULT_MODEL, "the embedded local model"
    if choice == "simulator":
        from llmbatch.testing import Simulator

        sim = await stack.enter_async_context(Simulator(invalid_json=0.1, seed=7))
        choice = sim.base_url
    key = os.environ.get("OPENAI_API_KEY", "sk-none")
    provider = OpenAIProvider(base_url=choice, api_key=key)
    return provider, os.environ.get("LLMBATCH_MODEL", "gpt-4o-mini"), choice


def load(docs_dir: Path) -> list[dict[str, str]]:
    return [
        {"doc": p.name, "text": p.read_text(encoding="utf-8")}
        for p in sorted(docs_dir.glob("*.txt"))
    ]


async def extract(docs: list[dict[str, str]], provider_choice: str) -> tuple[Any, str]:
    """The batch result (a Response or an ItemError per document), and where it ran."""
    async with AsyncExitStack() as stack:
        provider, model, where = await open_provider(provider_choice, stack)
        await stack.enter_async_context(provider)
        result = await llmbatch.map(
            PROMPT,
            docs,
            model=model,
            provider=provider,
            response_model=ShortReading if provider.name == "local" else Reading,
            max_tokens=300,
            limits=Limits(rpm=500),
            max_concurrency=1 if provider.name == "local" else 8,
            key=lambda doc: doc["doc"],
        )
    return result, where


def write(out: Path, docs: list[dict[str, str]], result: Any) -> dict[str, int]:
    """One JSON line per document: its reading, or its error."""
    ok = failed = reasks = 0
    with out.open("w", encoding="utf-8") as f:
        for doc, outcome in zip(docs, result, strict=True):
            if isinstance(outcome, ItemError):
                failed += 1
                line: dict[str, Any] = {"doc": doc["doc"], "error": outcome.to_dict()}
            else:
                ok += 1
                reasks += outcome.reasks
                reading: Reading = outcome.parsed
                line = {"doc": doc["doc"], "reading": reading.model_dump(mode="json")}
            f.write(json.dumps(line) + "\n")
    return {"ok": ok, "failed": failed, "reasks": reasks}


def main(docs_dir: Path, out: Path, provider_choice: str) -> dict[str, int]:
    docs = load(docs_dir)
    result, where = asyncio.run(extract(docs, provider_choice))
    counts = write(out, docs, result)
    print(
        f"{counts['ok']} read, {counts['failed']} failed, {counts['reasks']} re-asks, "
        f"via {where}; wrote {out}"
    )
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("docs_dir", nargs="?", type=Path, default=HERE / "docs")
    parser.add_argument("-o", "--out", type=Path, default=Path("readings.jsonl"))
    parser.add_argument(
        "--provider", default="auto", help="auto, openai, local, simulator, or a server's URL"
    )
    args = parser.parse_args()
    main(args.docs_dir, args.out, args.provider)
