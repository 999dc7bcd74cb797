"""The Batch APIs through a whole Simulator, with the batch clock injected."""

from __future__ import annotations

import io
import json

import openai

from llmbatch.testing import BatchSimConfig, FakeClock, Simulator


async def test_batch_round_trip_through_the_simulator_on_a_fake_wall_clock() -> None:
    """Simulator(batch_clock=...) lets a test step a batch job to completion by hand."""
    wall = FakeClock(start=1_700_000_000.0)
    config = BatchSimConfig(validating_seconds=1, seconds_per_request=1, finalizing_seconds=1)
    async with (
        Simulator(batch=config, batch_clock=wall.time) as sim,
        openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        lines = [
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": str(i)}]},
            }
            for i in range(3)
        ]
        data = "\n".join(json.dumps(line) for line in lines).encode()
        upload = await client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert "validating" == (await client.batches.retrieve(batch.id)).status
        wall.advance(1 + 3 + 1)
        done = await client.batches.retrieve(batch.id)
        assert ("completed", 3) == (done.status, done.request_counts.completed)  # type: ignore[union-attr]
        assert done.output_file_id is not None
        output = (await client.files.content(done.output_file_id)).text
        assert ["req-0", "req-1", "req-2"] == sorted(
            json.loads(line)["custom_id"] for line in output.splitlines()
        )
    assert 1 == sim.stats().batches_created
