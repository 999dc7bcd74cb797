"""Summarize a folder of documents with llmbatch's flow layer and LLM client.

    python examples/summarize.py [DOCS_DIR] [-o summaries.jsonl] [--provider auto]

Three nodes: load the ``*.txt`` files, summarize them in parallel (bounded, rate
limited, retried per item, failures collected rather than fatal), write one JSON line
per document: ``{"doc", "summary"}`` or ``{"doc", "error"}``. Every document ends as
exactly one of the two.

Providers (``--provider``):

* ``auto`` (default): OpenAI when ``OPENAI_API_KEY`` is set (or the OpenAI-compatible
  server at ``OPENAI_BASE_URL``), otherwise the embedded local model;
* ``local``: SmolLM2-135M-Instruct in this process (the ``local`` extra; no API key);
* ``openai``: OpenAI;
* ``simulator``: llmbatch's provider simulator on 127.0.0.1, failing 10% of requests
  with a 503 so that retries show.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from llmbatch import AsyncFlow, AsyncNode, AsyncParallelBatchNode, ItemError, LLMClient, Node
from llmbatch.limits import Limits
from llmbatch.models import Request
from llmbatch.providers.base import Provider

HERE = Path(__file__).parent
SYSTEM = "Summarize the document in one sentence."


class LoadDocs(Node):
    def prep(self, shared: dict[str, Any]) -> Path:
        return Path(shared["docs_dir"])

    def exec(self, docs_dir: Path) -> list[tuple[str, str]]:
        return [(p.name, p.read_text(encoding="utf-8")) for p in sorted(docs_dir.glob("*.txt"))]

    def post(self, shared: dict[str, Any], prep_res: Path, exec_res: list[tuple[str, str]]) -> None:
        shared["docs"] = exec_res


class Summarize(AsyncParallelBatchNode):
    """One LLM call per document; the client brings limits and retries."""

    def __init__(self, llm: LLMClient, max_concurrency: int) -> None:
        super().__init__(on_error="collect", max_concurrency=max_concurrency)
        self.llm = llm

    async def prep_async(self, shared: dict[str, Any]) -> list[tuple[str, str]]:
        return list(shared["docs"])

    async def exec_async(self, doc: tuple[str, str]) -> str:
        name, text = doc
        if not text.strip():
            raise ValueError(f"{name} is empty: nothing to summarize")
        response = await self.llm.complete(Request.from_prompt(text, system=SYSTEM, key=name))
        return response.text.strip()

    async def post_async(
        self, shared: dict[str, Any], prep_res: list[tuple[str, str]], exec_res: list[Any]
    ) -> None:
        # on_error="collect": exec_res is aligned with the documents, errors in place.
        shared["results"] = list(zip(prep_res, exec_res, strict=True))


class WriteJsonl(AsyncNode):
    async def prep_async(self, shared: dict[str, Any]) -> tuple[Path, list[Any]]:
        return Path(shared["out"]), shared["results"]

    async def exec_async(self, prep_res: tuple[Path, list[Any]]) -> tuple[int, int]:
        out, results = prep_res
        ok = failed = 0
        with out.open("w", encoding="utf-8") as f:
            for (name, _), result in results:
                if isinstance(result, ItemError):
                    failed += 1
                    record: dict[str, Any] = {"doc": name, "error": result.to_dict()}
                else:
                    ok += 1
                    record = {"doc": name, "summary": result}
                f.write(json.dumps(record) + "\n")
        return ok, failed

    async def post_async(
        self, shared: dict[str, Any], prep_res: Any, exec_res: tuple[int, int]
    ) -> None:
        shared["ok"], shared["failed"] = exec_res


async def open_provider(choice: str, stack: AsyncExitStack) -> tuple[Provider, str, str]:
    """``(provider, model, where)`` for the --provider choice."""
    if choice == "auto":
        choice = "openai" if os.environ.get("OPENAI_API_KEY") else "local"
    if choice == "openai":
        from llmbatch.providers.openai import OpenAIProvider

        provider: Provider = OpenAIProvider()
        return provider, os.environ.get("LLMBATCH_MODEL", "gpt-4o-mini"), "OpenAI"
    if choice == "local":
        from llmbatch.providers.local import DEFAULT_MODEL, LocalProvider

        return LocalProvider(), DEFAULT_MODEL, "the embedded local model"
    from llmbatch.providers.openai import OpenAIProvider
    from llmbatch.testing import Simulator

    sim = await stack.enter_async_context(Simulator(errors={503: 0.1}, seed=7))
    provider = OpenAIProvider(base_url=sim.base_url, api_key="sk-offline")
    return provider, "gpt-4o-mini", f"the offline simulator at {sim.url}"


async def main(docs_dir: Path, out: Path, provider_choice: str) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        provider, model, where = await open_provider(provider_choice, stack)
        concurrency = 1 if provider.name == "local" else 8
        llm = LLMClient(provider, model=model, max_tokens=64, limits=Limits(rpm=500))
        await stack.enter_async_context(llm)

        load, summarize, write = LoadDocs(), Summarize(llm, concurrency), WriteJsonl()
        load >> summarize >> write
        shared: dict[str, Any] = {"docs_dir": docs_dir, "out": out}
        started = time.perf_counter()
        await AsyncFlow(start=load).run_async(shared)
        seconds = time.perf_counter() - started
        print(
            f"{shared['ok']} summarized, {shared['failed']} failed, in {seconds:.2f} s "
            f"via {where}; wrote {out}"
        )
        return shared


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("docs_dir", nargs="?", type=Path, default=HERE / "docs")
    parser.add_argument("-o", "--out", type=Path, default=Path("summaries.jsonl"))
    parser.add_argument(
        "--provider", choices=["auto", "local", "openai", "simulator"], default="auto"
    )
    args = parser.parse_args()
    asyncio.run(main(args.docs_dir, args.out, args.provider))
