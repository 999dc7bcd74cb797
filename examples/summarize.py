"""Summarize a folder of documents with llmbatch's flow layer.

    python examples/summarize.py [DOCS_DIR] [-o summaries.jsonl]

Three nodes: load the ``*.txt`` files, summarize them in parallel (bounded, rate
limited, retried per item, failures collected rather than fatal), write one JSON line
per document: ``{"doc", "summary"}`` or ``{"doc", "error"}``. Every document ends as
exactly one of the two.

With no ``OPENAI_API_KEY`` in the environment the script starts llmbatch's provider
simulator on 127.0.0.1, with 10% of requests failing with a 503, so the whole pipeline
(retries included) runs offline. With ``OPENAI_API_KEY`` set it calls OpenAI, or the
OpenAI-compatible server at ``OPENAI_BASE_URL``.
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

import openai

from llmbatch import AsyncFlow, AsyncNode, AsyncParallelBatchNode, ItemError, Node
from llmbatch.limits import Limits, RateLimiter

HERE = Path(__file__).parent
MODEL = os.environ.get("LLMBATCH_MODEL", "gpt-4o-mini")


class LoadDocs(Node):
    def prep(self, shared: dict[str, Any]) -> Path:
        return Path(shared["docs_dir"])

    def exec(self, docs_dir: Path) -> list[tuple[str, str]]:
        return [(p.name, p.read_text(encoding="utf-8")) for p in sorted(docs_dir.glob("*.txt"))]

    def post(self, shared: dict[str, Any], prep_res: Path, exec_res: list[tuple[str, str]]) -> None:
        shared["docs"] = exec_res


class Summarize(AsyncParallelBatchNode):
    def __init__(self, client: openai.AsyncOpenAI, limiter: RateLimiter) -> None:
        super().__init__(max_retries=4, wait=0.05, on_error="collect", limiter=limiter)
        self.client = client

    async def prep_async(self, shared: dict[str, Any]) -> list[tuple[str, str]]:
        return list(shared["docs"])

    async def exec_async(self, doc: tuple[str, str]) -> str:
        name, text = doc
        if not text.strip():
            raise ValueError(f"{name} is empty: nothing to summarize")
        response = await self.client.chat.completions.create(
            model=MODEL,
            max_tokens=64,
            messages=[
                {"role": "system", "content": "Summarize the document in one sentence."},
                {"role": "user", "content": text},
            ],
        )
        return response.choices[0].message.content or ""

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


async def main(docs_dir: Path, out: Path) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        if os.environ.get("OPENAI_API_KEY"):
            client = openai.AsyncOpenAI(max_retries=0)  # llmbatch's node retries, not the SDK
            where = client.base_url.host
        else:
            from llmbatch.testing import Simulator

            sim = await stack.enter_async_context(Simulator(errors={503: 0.1}, seed=7))
            client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-offline", max_retries=0)
            where = f"the offline simulator at {sim.url}"
        await stack.enter_async_context(client)
        limiter = RateLimiter(Limits(rpm=500, max_concurrency=8), name=f"openai/{MODEL}")

        load, summarize, write = LoadDocs(), Summarize(client, limiter), WriteJsonl()
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
    args = parser.parse_args()
    asyncio.run(main(args.docs_dir, args.out))
