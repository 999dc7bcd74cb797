"""Summarize a folder of documents over several API keys, with a fallback model.

    OPENAI_API_KEYS=sk-a,sk-b,sk-c python examples/many_keys.py [DOCS_DIR] [-o out.jsonl]
    python examples/many_keys.py --provider simulator       # offline, nothing to pay

Each key has its own quota: a ``KeyPool`` sends every request through the key with the
most room left, and a key the provider refuses (revoked, out of quota) is retired with
one warning while the others finish. Documents the first model cannot answer (it is
unavailable after the retries, or the document is too long for it) go to the fallback
model, and each output line says which model answered and what it cost.

``--provider simulator`` runs against llmbatch's simulator on 127.0.0.1 with three keys,
the second revoked after its tenth request, and the first model unavailable for about a
fifth of the documents: every document is still answered.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
from contextlib import AsyncExitStack
from pathlib import Path

import llmbatch
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.providers.pool import KeyPool
from llmbatch.testing import Fault, RequestInfo, Simulator

HERE = Path(__file__).parent
MODEL, FALLBACK = "gpt-4o-mini", "gpt-4o"
SIMULATED_KEYS = ["sk-sim-key-one", "sk-sim-key-two", "sk-sim-key-three"]


def flaky_simulator() -> Simulator:
    """Three keys of 600 RPM; the second revoked after 10 requests; the first model
    answering 503 to about a fifth of the documents, every time."""
    seen: dict[str, int] = {}

    def script(info: RequestInfo) -> Fault | None:
        seen[info.api_key] = seen.get(info.api_key, 0) + 1
        if info.api_key == SIMULATED_KEYS[1] and seen[info.api_key] > 10:
            return Fault(status=401)
        text = str(info.body["messages"][-1]["content"])
        if info.model == MODEL and hashlib.sha256(text.encode()).digest()[0] % 5 == 0:
            return Fault(status=503, retry_after=0.05)
        return None

    return Simulator(rpm=600, ttft=0.05, script=script)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("docs", nargs="?", type=Path, default=HERE / "docs")
    parser.add_argument("-o", "--output", type=Path, default=Path("many_keys.jsonl"))
    parser.add_argument("--provider", choices=["openai", "simulator"], default="openai")
    args = parser.parse_args()
    paths = sorted(p for p in args.docs.glob("*.txt"))
    async with AsyncExitStack() as stack:
        if args.provider == "simulator":
            sim = await stack.enter_async_context(flaky_simulator())
            base_url: str | None = sim.base_url
            keys = SIMULATED_KEYS
        else:
            base_url = None
            keys = [k for k in os.environ.get("OPENAI_API_KEYS", "").split(",") if k.strip()]
            if not keys:
                raise SystemExit("set OPENAI_API_KEYS=sk-a,sk-b,... (or --provider simulator)")
        pool = KeyPool([OpenAIProvider(api_key=k.strip(), base_url=base_url) for k in keys])
        await stack.enter_async_context(pool)
        result = await llmbatch.map(
            "Summarize in one sentence:\n\n{text}",
            [{"text": p.read_text()} for p in paths],
            model=MODEL,
            provider=pool,
            fallbacks=[FALLBACK],
            max_tokens=64,
        )
    by_model: dict[str, int] = {}
    with args.output.open("w") as out:
        for path, outcome in zip(paths, result.results, strict=True):
            if isinstance(outcome, llmbatch.Response):
                model = (outcome.model or "?").split("-20")[0]
                by_model[model] = by_model.get(model, 0) + 1
                line = {"doc": path.name, "summary": outcome.text, "model": outcome.model}
                line["cost"] = outcome.cost
            else:
                line = {"doc": path.name, "error": outcome.message}
            out.write(json.dumps(line) + "\n")
    answered = ", ".join(f"{n} by {m}" for m, n in sorted(by_model.items()))
    print(f"{len(result.ok)} summarized ({answered}), {len(result.errors)} failed")


if __name__ == "__main__":
    asyncio.run(main())
