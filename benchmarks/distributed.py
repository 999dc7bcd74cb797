"""Four Ray workers sharing one provider quota, against the simulator.

    python benchmarks/distributed.py [--items 1000] [--rpm 600]

One simulator process enforces RPM (buckets start full, ~1 s latency). Four Ray actors
(:class:`llmbatch.integrations.ray.LLMBatchUDF`, a quarter of the rows each) answer the
same requests three ways, one after another, each against a fresh simulator:

* ``ray actor quota``: one :class:`~llmbatch.integrations.ray.QuotaActor` paces all
  four at the RPM;
* ``redis quota``: the four share a Redis-backed limiter (a ``redis-server`` this
  script starts on 127.0.0.1);
* ``per-worker rpm/4``: Ray Data's own approach (``qps`` per worker): each worker
  paces alone at a quarter of the RPM.

The clock starts once the actors are built (Ray's start-up is not the limiter's cost).
Columns: wall time, the least possible time (the simulator's bucket starts full:
latency + (items - rpm) / rate), efficiency = least / wall, rows answered, 429s.
Targets (issue #9): efficiency >= 0.95 and 429s <= 1% of requests for the shared quotas.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import structlog
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from limits import LATENCY, MODEL, PARAGRAPH, redis_server, server_stats, simulator

from llmbatch.integrations.ray import LLMBatchUDF, close_quota

WORKERS = 4


def provider_at(base_url: str) -> Any:
    def make() -> Any:
        from llmbatch.providers.openai import OpenAIProvider

        return OpenAIProvider(base_url=base_url, api_key="sk-bench")

    return make


def run(name: str, items: int, rpm: int, redis_url: str) -> dict[str, Any]:
    with simulator({"rpm": rpm}) as root:
        settings: dict[str, Any] = {
            "template": "{text}",
            "model": MODEL,
            "provider": provider_at(f"{root}/v1"),
            "max_tokens": 128,
            "max_concurrency": 256,
        }
        if name == "ray actor quota":
            settings |= {"limits": {"rpm": rpm}, "quota": f"bench-{uuid.uuid4().hex[:8]}"}
        elif name == "redis quota":
            quota = f"bench-{uuid.uuid4().hex[:8]}"
            settings |= {"limits": {"rpm": rpm}, "redis_url": redis_url, "quota": quota}
        else:
            settings |= {"limits": {"rpm": rpm / WORKERS}, "quota": None}
        actor_class = ray.remote(LLMBatchUDF).options(num_cpus=0.25)
        actors = [actor_class.remote(**settings) for _ in range(WORKERS)]
        ray.get([a.__ray_ready__.remote() for a in actors])
        frame = pd.DataFrame({"text": [PARAGRAPH.format(i=i) for i in range(items)]})
        parts = [frame.iloc[i::WORKERS] for i in range(WORKERS)]
        started = time.perf_counter()
        results = ray.get([a.answer.remote(part) for a, part in zip(actors, parts, strict=True)])
        seconds = time.perf_counter() - started
        stats = server_stats(root)
        for actor in actors:
            ray.kill(actor)
        if settings.get("quota") and "redis_url" not in settings:
            close_quota(settings["quota"])
    answered = sum(int(r["llm_error"].isna().sum()) for r in results)
    return {
        "seconds": seconds,
        "ok": answered,
        "rate_limited": sum(stats["rate_limited"].values()),
        "requests": stats["requests"],
    }


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--rpm", type=int, default=600)
    args = parser.parse_args()
    least = LATENCY + max(0.0, args.items - args.rpm) / (args.rpm / 60)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    table = Table(title=f"{args.items} requests, RPM {args.rpm}, {WORKERS} Ray workers")
    for column in ("quota", "wall s", "least s", "efficiency", "ok", "429s", "requests"):
        table.add_column(column)
    with redis_server() as redis_url:
        for name in ("ray actor quota", "redis quota", "per-worker rpm/4"):
            out = run(name, args.items, args.rpm, redis_url)
            table.add_row(
                name,
                f"{out['seconds']:.1f}",
                f"{least:.1f}",
                f"{least / out['seconds']:.3f}",
                str(out["ok"]),
                str(out["rate_limited"]),
                str(out["requests"]),
            )
            Console().print(f"{name}: done in {out['seconds']:.1f} s")
    ray.shutdown()
    Console().print(table)


if __name__ == "__main__":
    main()
