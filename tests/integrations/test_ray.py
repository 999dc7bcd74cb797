"""llmbatch.integrations.ray on a local Ray cluster (``ray.init(num_cpus=2)``): four
workers, one quota, one simulator that enforces the same limit."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from llmbatch.integrations.ray import LLMBatchUDF, close_quota  # noqa: E402 - after the importorskip
from llmbatch.testing import Simulator  # noqa: E402
from llmbatch.testing._content import content_tag  # noqa: E402

pytestmark = [
    pytest.mark.timeout(300),
    # Ray's own deprecation notices (ray.data.context) are not ours to fix
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A local Ray cluster for this module (about 8 s to start here)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def openai_at(base_url: str) -> Callable[[], Any]:
    """A provider factory the workers call (the key is the simulator's; real jobs read
    OPENAI_API_KEY in the worker)."""

    def make() -> Any:
        from llmbatch.providers.openai import OpenAIProvider

        return OpenAIProvider(base_url=base_url, api_key="sk-test")

    return make


def run(
    sim: Simulator, rows: list[dict[str, Any]], *, workers: int = 4, **udf: Any
) -> list[dict[str, Any]]:
    ds = ray.data.from_items(rows)
    settings = {
        "template": "Summarize: {text}",
        "model": "gpt-4o-mini",
        "provider": openai_at(sim.base_url),
        "quota": f"quota-{uuid.uuid4().hex[:8]}",
        **udf,
    }
    out = ds.map_batches(
        LLMBatchUDF,
        fn_constructor_kwargs=settings,
        concurrency=workers,
        num_cpus=0.25,
        batch_size=10,
        batch_format="pandas",
    )
    try:
        result: list[dict[str, Any]] = out.take_all()
    finally:
        close_quota(settings["quota"])
    return result


@pytest.mark.parametrize("shared_through", ["ray-actor", "redis"])
def test_four_workers_share_one_quota(
    cluster: None,
    threaded_simulator_factory: Callable[..., Simulator],
    redis_url: str,
    shared_through: str,
) -> None:
    """Four workers together stay under the simulator's RPM (which they exceed fourfold
    if each paced alone): no 429, every row answered with its own answer."""
    sim = threaded_simulator_factory(rpm=120)
    rows = [{"id": i, "text": f"document {i}"} for i in range(150)]
    extra: dict[str, Any] = {"redis_url": redis_url} if shared_through == "redis" else {}
    result = run(sim, rows, limits={"rpm": 120}, **extra)
    assert sorted(r["id"] for r in result) == list(range(150))
    errors = [r["llm_error"] for r in result if isinstance(r["llm_error"], str)]
    assert [] == errors
    for r in result:
        tag = content_tag("Summarize: " + r["text"])
        assert r["llm_answer"].startswith(f"[{tag}]")
    stats = sim.stats()
    assert {} == dict(stats.rate_limited)
    assert 150 == stats.ok


def test_failed_rows_are_rows_and_a_fatal_error_stops_the_dataset(
    cluster: None, threaded_simulator_factory: Callable[..., Simulator]
) -> None:
    """Under collect a bad row keeps its place with an error; a refused key stops the
    dataset with llmbatch's message."""
    sim = threaded_simulator_factory()
    rows = [{"text": "fine"}, {"text": "  "}, {"text": "also fine"}]
    result = run(sim, rows, workers=1, limits={"rpm": 10_000})
    errors = {r["text"]: r["llm_error"] for r in result}
    assert "empty" in errors["  "]
    assert errors["fine"] is None or errors["fine"] != errors["fine"]  # None or NaN

    guarded = threaded_simulator_factory(api_keys=["sk-the-only-valid-key"])
    with pytest.raises(Exception, match="llmbatch stopped the dataset") as caught:
        run(guarded, rows, workers=1, limits={"rpm": 10_000})
    assert "AuthenticationFailed" in str(caught.value)


def test_a_second_dataset_is_served_from_the_shared_redis_cache(
    cluster: None,
    threaded_simulator_factory: Callable[..., Simulator],
    redis_url: str,
) -> None:
    """``cache="redis://..."``: four workers of a first dataset store their answers;
    a second dataset over the same rows (other workers, other processes) sends no
    request and gets the same answers, marked as cached."""
    sim = threaded_simulator_factory()
    rows = [{"id": i, "text": f"cached document {i}"} for i in range(40)]
    first = run(sim, rows, limits={"rpm": 10_000}, cache=redis_url)
    sent = sim.stats().ok
    second = run(sim, rows, limits={"rpm": 10_000}, cache=redis_url)
    assert 40 == sent
    assert 40 == sim.stats().ok  # nothing sent for the second dataset
    answers = {r["id"]: r["llm_answer"] for r in first}
    assert answers == {r["id"]: r["llm_answer"] for r in second}
