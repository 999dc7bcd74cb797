"""Typed answers in the integrations: ``df.llm.map(response_model=...)`` and
``LLMBatchUDF(response_model=...)`` give a column per field, against the simulator."""

from __future__ import annotations

import importlib
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest

pytest.importorskip("pandas")
pytest.importorskip("pydantic")

import pandas as pd
from pydantic import BaseModel

from llmbatch.integrations.pandas import map_dataframe
from llmbatch.limits import Limits
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.testing import Fault, RequestInfo, Simulator
from llmbatch.testing._content import content_tag

LIMITS = Limits(rpm=100_000, tpm=100_000_000)
TEMPLATE = "Read: {text}"


class Reading(BaseModel):
    """What a text says."""

    summary: str
    topics: list[str]
    sentiment: Literal["pos", "neg", "neutral"]


def frame() -> pd.DataFrame:
    """Four rows with a non-default index; the third has an empty text."""
    return pd.DataFrame({"text": ["alpha", "beta", " ", "delta"]}, index=["a", "b", "c", "d"])


def tag(text: str) -> str:
    return f"[{content_tag(TEMPLATE.format(text=text))}]"


FIELD_COLUMNS = ["llm_summary", "llm_topics", "llm_sentiment"]
ERROR_COLUMNS = ["llm_error", "llm_input_tokens", "llm_output_tokens", "llm_cost"]


async def test_a_response_model_gives_a_column_per_field(simulator: Simulator) -> None:
    """``response_model=Reading``: one column per field in place of ``llm_answer``, each
    row its own typed answer; a failed row keeps its place, fields empty."""
    df = frame()
    async with OpenAIProvider(base_url=simulator.base_url, api_key="sk-test") as provider:
        out = await df.llm.amap(
            TEMPLATE, model="gpt-4o-mini", provider=provider, limits=LIMITS, response_model=Reading
        )
    assert FIELD_COLUMNS + ERROR_COLUMNS == list(out.columns)
    assert list(df.index) == list(out.index)
    for label in ["a", "b", "d"]:
        row = out.loc[label]
        assert row["llm_summary"].startswith(tag(df.loc[label, "text"]))
        assert isinstance(row["llm_topics"], list)
        assert row["llm_sentiment"] in ("pos", "neg", "neutral")
        assert pd.isna(row["llm_error"])
        assert row["llm_cost"] > 0
    failed = out.loc["c"]
    assert "empty" in failed["llm_error"]
    assert all(pd.isna(failed[c]) for c in FIELD_COLUMNS)
    assert 3 == simulator.stats().structured["answered"]


def test_an_answer_that_stays_invalid_is_the_rows_error(
    threaded_simulator_factory: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """From synchronous code (``df.llm.map``) with a JSON Schema dict: an answer still
    unparseable after ``max_reasks`` is the row's InvalidOutput error, fields empty;
    the rows whose answers were fine are typed."""

    def broken_for_beta(info: RequestInfo) -> Fault | None:
        prompt = info.body["messages"][0]["content"]
        return Fault(kind="invalid_json") if "beta" in prompt else None

    sim = threaded_simulator_factory(script=broken_for_beta)
    schema = {"title": "Gist", "type": "object", "properties": {"gist": {"type": "string"}}}
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    out = map_dataframe(
        frame().drop(index="c"),
        TEMPLATE,
        model="gpt-4o-mini",
        limits=LIMITS,
        response_model=schema,
        max_reasks=1,
        prefix="",
    )
    assert ["gist", "error", "input_tokens", "output_tokens", "cost"] == list(out.columns)
    assert out.loc["b", "error"].startswith("InvalidOutput: ")
    assert pd.isna(out.loc["b", "gist"])
    assert out.loc["a", "gist"].startswith(tag("alpha"))
    assert out.loc["d", "gist"].startswith(tag("delta"))
    assert 4 == sim.stats().requests  # three answers and one re-ask for beta


def test_a_field_named_like_a_result_column_is_refused_before_any_request() -> None:
    """A field called ``error`` would be hidden by the error column: a ValueError at once."""
    schema = {"type": "object", "properties": {"error": {"type": "string"}}}
    with pytest.raises(ValueError, match="field 'error'"):
        map_dataframe(frame(), TEMPLATE, model="gpt-4o-mini", response_model=schema)


# -- Ray -------------------------------------------------------------------------------

#: a module the Ray workers import the model from, as a user's own module
MODELS = """
from typing import Literal

from pydantic import BaseModel


class Reading(BaseModel):
    summary: str
    topics: list[str]
    sentiment: Literal["pos", "neg", "neutral"]
"""


@pytest.fixture(scope="module")
def ray_with_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A local Ray cluster whose workers can import ``typed_models`` (as the driver can)."""
    ray = pytest.importorskip("ray")
    folder = tmp_path_factory.mktemp("models")
    (folder / "typed_models.py").write_text(MODELS)
    sys.path.insert(0, str(folder))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(folder)}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        sys.path.remove(str(folder))
        sys.modules.pop("typed_models", None)


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")
def test_ray_udf_gives_a_column_per_field(
    ray_with_models: Any, threaded_simulator_factory: Callable[..., Simulator]
) -> None:
    """``LLMBatchUDF(response_model=Reading)`` on two workers: the model travels by
    reference, each row gets its typed answer as columns, and the spoiled answers
    (30%) are re-asked inside the workers."""
    from llmbatch.integrations.ray import LLMBatchUDF, close_quota

    ray = ray_with_models
    reading = importlib.import_module("typed_models").Reading
    sim = threaded_simulator_factory(invalid_json=0.3, seed=5)
    base_url = sim.base_url

    def provider() -> Any:
        from llmbatch.providers.openai import OpenAIProvider

        return OpenAIProvider(base_url=base_url, api_key="sk-test")

    rows = [{"id": i, "text": f"document {i}"} for i in range(20)]
    quota = f"quota-{uuid.uuid4().hex[:8]}"
    out = ray.data.from_items(rows).map_batches(
        LLMBatchUDF,
        fn_constructor_kwargs={
            "template": TEMPLATE,
            "model": "gpt-4o-mini",
            "provider": provider,
            "limits": {"rpm": 100_000},
            "quota": quota,
            "response_model": reading,
        },
        concurrency=2,
        num_cpus=0.25,
        batch_size=5,
        batch_format="pandas",
    )
    try:
        result: list[dict[str, Any]] = out.take_all()
    finally:
        close_quota(quota)
    assert list(range(20)) == sorted(r["id"] for r in result)
    for r in result:
        assert {"llm_summary", "llm_topics", "llm_sentiment", "llm_error"} <= set(r)
        assert "llm_answer" not in r
        assert r["llm_summary"].startswith(tag(r["text"]))
        assert r["llm_sentiment"] in ("pos", "neg", "neutral")
    structured = sim.stats().structured
    assert structured["invalid_json"] > 0
    assert structured["invalid_json"] == structured["follow_ups"]
    assert 20 + structured["invalid_json"] == sim.stats().requests
