"""One worker process of the shared-quota test: N requests through a Redis limiter.

    python tests/helpers/redis_worker.py BASE_URL REDIS_URL QUOTA RPM COUNT

Prints one JSON line: {"ok": ..., "rate_limited": ...}.
"""

from __future__ import annotations

import asyncio
import json
import sys

import openai
from redis.asyncio import Redis

from llmbatch import run_batch
from llmbatch.limits import Limits, RedisRateLimiter


async def main(base_url: str, redis_url: str, quota: str, rpm: int, count: int) -> None:
    redis = Redis.from_url(redis_url)
    limiter = RedisRateLimiter(redis, Limits(rpm=rpm, initial_fill=1.0), quota=quota)
    rate_limited = 0
    async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-shared", max_retries=0) as client:

        async def one(i: int) -> None:
            nonlocal rate_limited
            while True:
                async with limiter:
                    try:
                        await client.chat.completions.create(
                            model="gpt-4o-mini",
                            messages=[{"role": "user", "content": f"item {i}"}],
                            max_tokens=8,
                        )
                        return
                    except openai.RateLimitError as exc:
                        rate_limited += 1
                        await limiter.on_rate_limited(
                            float(exc.response.headers.get("retry-after", "1"))
                        )

        result = await run_batch(one, range(count), max_concurrency=64)
    await limiter.flush()
    await redis.aclose()
    print(json.dumps({"ok": result.succeeded, "rate_limited": rate_limited}))


if __name__ == "__main__":
    url, redis_url, quota, rpm, count = sys.argv[1:]
    asyncio.run(main(url, redis_url, quota, int(rpm), int(count)))
