"""Summarize a DataFrame column with llmbatch: one call per row, results as columns.

    python examples/pandas_summarize.py [--provider simulator|openai]

Reads ``examples/docs/*.txt`` into a DataFrame (one row per document), summarizes each
row through ``df.llm.map`` (rate limited, retried, failures kept as rows), and prints
the table. ``--provider simulator`` (default) runs against llmbatch's offline provider
simulator; ``openai`` uses ``OPENAI_API_KEY``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pandas as pd

import llmbatch.integrations.pandas  # noqa: F401 - registers the df.llm accessor
from llmbatch.limits import Limits
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.testing import Simulator

DOCS = Path(__file__).parent / "docs"


def load() -> pd.DataFrame:
    files = sorted(DOCS.glob("*.txt"))
    return pd.DataFrame(
        {"text": [f.read_text(encoding="utf-8") for f in files]}, index=[f.stem for f in files]
    )


async def main(provider_name: str) -> pd.DataFrame:
    df = load()
    options = {"model": "gpt-4o-mini", "max_tokens": 60, "limits": Limits(rpm=500)}
    if provider_name == "openai":
        out = await df.llm.amap("Summarize in one sentence:\n\n{text}", **options)
    else:
        async with (
            Simulator(errors={503: 0.1}, seed=3) as sim,
            OpenAIProvider(base_url=sim.base_url, api_key="sk-offline") as provider,
        ):
            out = await df.llm.amap(
                "Summarize in one sentence:\n\n{text}", provider=provider, **options
            )
    result = pd.concat([df, out], axis=1)
    print(result[["llm_answer", "llm_error", "llm_cost"]].to_string(max_colwidth=60))
    print(f"\n{out['llm_error'].isna().sum()} of {len(df)} rows answered")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=["simulator", "openai"], default="simulator")
    asyncio.run(main(parser.parse_args().provider))
