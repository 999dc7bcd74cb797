"""llmbatch.integrations.pandas: LLM calls as a DataFrame transform, against the simulator."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("pandas")

import pandas as pd

from llmbatch.failure import BatchFailed
from llmbatch.integrations.pandas import map_dataframe
from llmbatch.limits import Limits
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.testing import Simulator
from llmbatch.testing._content import content_tag

LIMITS = Limits(rpm=100_000, tpm=100_000_000)


def frame() -> pd.DataFrame:
    """Five rows with a non-default, duplicated index; the third has an empty text."""
    return pd.DataFrame(
        {"text": ["alpha", "beta", "  ", "delta", "epsilon"], "n": [1, 2, 3, 4, 5]},
        index=["r1", "r2", "r3", "r1", "r5"],
    )


async def test_collect_keeps_every_row_aligned_with_the_index(simulator: Simulator) -> None:
    """Answers line up with their rows (the index, duplicates included); a failed row
    keeps its place with an error and no answer."""
    df = frame()
    async with OpenAIProvider(base_url=simulator.base_url, api_key="sk-test") as provider:
        out = await df.llm.amap(
            "Summarize: {text} ({n})", model="gpt-4o-mini", provider=provider, limits=LIMITS
        )
    assert list(df.index) == list(out.index)
    expected_cols = ["llm_answer", "llm_error", "llm_input_tokens", "llm_output_tokens", "llm_cost"]
    assert expected_cols == list(out.columns)
    for (_, row), (_, result) in zip(df.iterrows(), out.iterrows(), strict=True):
        if row["text"].strip():
            tag = content_tag(f"Summarize: {row['text']} ({row['n']})")
            assert result["llm_answer"].startswith(f"[{tag}]")
            assert pd.isna(result["llm_error"])
            assert result["llm_input_tokens"] > 0
            assert result["llm_cost"] > 0
        else:
            assert "ValueError" in result["llm_error"]
            assert "empty" in result["llm_error"]
            assert 0 == result["llm_input_tokens"]
    joined = pd.concat([df, out], axis=1)
    assert 5 == len(joined)
    assert 4 == simulator.stats().ok


async def test_skip_leaves_failed_rows_out(simulator: Simulator) -> None:
    """``on_error="skip"``: the result holds only the answered rows, with their labels."""
    df = frame()
    async with OpenAIProvider(base_url=simulator.base_url, api_key="sk-test") as provider:
        out = await df.llm.amap(
            "Summarize: {text}",
            model="gpt-4o-mini",
            provider=provider,
            limits=LIMITS,
            on_error="skip",
            prefix="",
        )
    assert ["r1", "r2", "r1", "r5"] == list(out.index)
    assert out["error"].isna().all()
    assert [content_tag(f"Summarize: {t}") for t in ["alpha", "beta", "delta", "epsilon"]] == [
        a[1:9] for a in out["answer"]
    ]


async def test_fail_fast_raises_with_the_failed_row(simulator: Simulator) -> None:
    """``on_error="fail_fast"``: the first failed row raises BatchFailed naming it."""
    df = frame()
    async with OpenAIProvider(base_url=simulator.base_url, api_key="sk-test") as provider:
        with pytest.raises(BatchFailed) as caught:
            await df.llm.amap(
                "Summarize: {text}",
                model="gpt-4o-mini",
                provider=provider,
                limits=LIMITS,
                on_error="fail_fast",
                max_concurrency=1,
            )
    assert "r3" == caught.value.error.key
    assert "ValueError" == caught.value.error.error_type


async def test_a_missing_column_is_that_row_s_error(simulator: Simulator) -> None:
    """A template naming a column the frame lacks fails each row, clearly."""
    df = pd.DataFrame({"body": ["x"]})
    async with OpenAIProvider(base_url=simulator.base_url, api_key="sk-test") as provider:
        out = await df.llm.amap("{text}", model="gpt-4o-mini", provider=provider, limits=LIMITS)
    assert "KeyError" in out.loc[0, "llm_error"]
    assert "text" in out.loc[0, "llm_error"]


def test_map_dataframe_from_synchronous_code_and_inside_a_running_loop(
    threaded_simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The synchronous call works from plain code, and from inside a running event loop
    (as in a Jupyter cell), where it runs the batch on its own loop in a thread. With no
    provider given it uses OpenAI's environment variables (and closes what it made)."""
    monkeypatch.setenv("OPENAI_BASE_URL", threaded_simulator.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    df = pd.DataFrame({"text": ["one", "two"]})

    def call() -> pd.DataFrame:
        return map_dataframe(df, "Summarize: {text}", model="gpt-4o-mini", limits=LIMITS)

    async def notebook_cell() -> pd.DataFrame:
        asyncio.get_running_loop()  # a loop is running, as in Jupyter
        return call()

    expected = [content_tag(f"Summarize: {t}") for t in ["one", "two"]]
    plain = call()
    in_loop = asyncio.run(notebook_cell())
    assert expected == [a[1:9] for a in plain["llm_answer"]]
    assert expected == [a[1:9] for a in in_loop["llm_answer"]]
