"""Summarize documents on a local Ray cluster: four workers, one shared quota.

    python examples/ray_summarize.py

Starts the offline provider simulator with an RPM limit, then runs Ray Data's
``map_batches`` with :class:`llmbatch.integrations.ray.LLMBatchUDF` on four workers.
They share one quota through a named Ray actor, so together they stay under the RPM
(Ray's own per-worker ``qps`` would let each of them use it all). Prints the
simulator's count of requests and 429s.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import ray

from llmbatch.integrations.ray import LLMBatchUDF, close_quota
from llmbatch.testing import Simulator

DOCS = Path(__file__).parent / "docs"
RPM = 120


def serve(ready: threading.Event, box: dict[str, Any], stop: threading.Event) -> None:
    """Run the simulator on its own loop while Ray's driver blocks this thread."""

    async def main() -> None:
        async with Simulator(rpm=RPM) as sim:
            box["sim"] = sim
            ready.set()
            await asyncio.to_thread(stop.wait)
            box["stats"] = sim.stats()

    asyncio.run(main())


def provider_at(base_url: str) -> Any:
    def make() -> Any:
        from llmbatch.providers.openai import OpenAIProvider

        return OpenAIProvider(base_url=base_url, api_key="sk-offline")

    return make


def main() -> dict[str, Any]:
    ready, stop, box = threading.Event(), threading.Event(), {}
    server = threading.Thread(target=serve, args=(ready, box, stop))
    server.start()
    ready.wait()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = [{"name": p.stem, "text": p.read_text(encoding="utf-8")} for p in DOCS.glob("*.txt")]
        ds = ray.data.from_items(rows).map_batches(
            LLMBatchUDF,
            fn_constructor_kwargs={
                "template": "Summarize in one sentence:\n\n{text}",
                "model": "gpt-4o-mini",
                "limits": {"rpm": RPM},  # the quota of all four workers together
                "provider": provider_at(box["sim"].base_url),
                "max_tokens": 60,
            },
            concurrency=4,
            num_cpus=0.25,
            batch_size=4,
            batch_format="pandas",
        )
        out = ds.take_all()
    finally:
        close_quota("llmbatch-quota")  # the shared quota actor outlives the workers
        ray.shutdown()
        stop.set()
        server.join()
    stats = box["stats"]
    answered = sum(1 for r in out if isinstance(r["llm_answer"], str))
    print(f"{answered} of {len(rows)} documents summarized by 4 workers")
    print(f"simulator: {stats.requests} requests, {sum(stats.rate_limited.values())} 429s")
    return {"rows": out, "stats": stats}


if __name__ == "__main__":
    main()
