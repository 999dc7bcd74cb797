"""LLM calls as a DataFrame column transform::

    import llmbatch.integrations.pandas  # registers the ``df.llm`` accessor

    out = df.llm.map("Summarize: {text}", model="gpt-4o-mini", provider=provider)
    df = df.join(out)      # llm_answer, llm_error, llm_input_tokens, llm_output_tokens, llm_cost

With ``response_model=Model`` (a pydantic model or a JSON Schema dict) each answer is
typed, and the result has a column per top-level field of the model instead of
``llm_answer``::

    out = df.llm.map("Read: {text}", model="gpt-4o-mini", response_model=Reading)
    # llm_summary, llm_topics, llm_sentiment, llm_error, llm_input_tokens, ...

Every row goes through the same limits, retries and failure policy as
:func:`llmbatch.map`: ``"collect"`` (default) keeps failed rows with their error,
``"skip"`` leaves them out of the result, ``"fail_fast"`` raises
:class:`~llmbatch.failure.BatchFailed` at the first one. The result is indexed like the
input, so it joins back whatever the index is (duplicates included). It works from
plain code and inside Jupyter (a running event loop): see :func:`map_dataframe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Hashable
from typing import Any

try:
    import pandas as pd
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "llmbatch.integrations.pandas needs pandas: pip install 'llmbatch[pandas]'"
    ) from exc

from llmbatch.api import map as llm_map
from llmbatch.failure import BatchResult, ItemError, OnError, failure_strategy
from llmbatch.io import answer_fields
from llmbatch.models import Request, Response
from llmbatch.structured import ResponseModel, ResponseSchema

__all__ = ["LLMAccessor", "amap_dataframe", "map_dataframe", "result_columns", "result_frame"]

#: the columns the result has, after the prefix
COLUMNS = ("answer", "error", "input_tokens", "output_tokens", "cost")
#: the columns after a typed answer's fields
_AFTER_FIELDS = COLUMNS[1:]


def result_columns(schema: ResponseSchema[Any] | None = None) -> list[str]:
    """The result's columns, before the prefix: :data:`COLUMNS`, or with a response
    model one per top-level field of its schema in place of ``answer``.

    Raises:
        ValueError: a field has the name of another result column.
    """
    if schema is None:
        return list(COLUMNS)
    fields = [str(name) for name in schema.schema.get("properties", {})]
    for name in fields:
        if name in _AFTER_FIELDS:
            raise ValueError(
                f"the response model's field {name!r} has the name of a result column "
                f"({', '.join(_AFTER_FIELDS)}): rename the field"
            )
    return [*fields, *_AFTER_FIELDS]


async def amap_dataframe(
    df: pd.DataFrame,
    template: str | Callable[[dict[str, Any]], Request | str],
    *,
    model: str,
    prefix: str = "llm_",
    on_error: OnError | str = OnError.COLLECT,
    response_model: ResponseModel | None = None,
    **options: Any,
) -> pd.DataFrame:
    """One LLM call per row of *df*; the answers as a DataFrame with *df*'s index.

    Args:
        df: the rows; a ``str.format`` template sees each row's columns by name.
        template: the prompt template, or a callable from the row (a dict) to a Request
            or a prompt.
        model: the model.
        prefix: the result's column prefix (``llm_answer``, ``llm_error``...).
        on_error: ``"collect"``, ``"skip"`` (failed rows left out) or ``"fail_fast"``.
        response_model: a typed answer for every row (a pydantic model class or a JSON
            Schema dict): the result then has a column per top-level field of it
            (``llm_summary``...) in place of ``llm_answer``, empty for a failed row.
            An answer still invalid after the re-asks (``max_reasks``) is the row's
            ``InvalidOutput`` error.
        **options: what :func:`llmbatch.map` takes (``provider``, ``system``,
            ``max_tokens``, ``limits``, ``retry``, ``max_concurrency``, ``max_cost``,
            ``max_reasks``, ``finish_policy``, ``mode``, ``prefer``, ``deadline``,
            ``journal``).

    Raises:
        BatchFailed: under ``"fail_fast"``, or on a fatal error (the partial results are
            on the exception).
        ValueError: a field of the response model has the name of another column.
    """
    schema = ResponseSchema.of(response_model) if response_model is not None else None
    result_columns(schema)  # a clash fails before any request
    if schema is not None:
        options["response_model"] = schema
    labels = list(df.index)
    rows = df.to_dict("records")
    keyed = list(enumerate(rows))
    result = await llm_map(
        lambda pair: _row_request(template, pair[1]),
        keyed,
        model=model,
        on_error=on_error,
        key=lambda pair: _label(labels[pair[0]]),
        **options,
    )
    return result_frame(result, labels, prefix=prefix, on_error=on_error, schema=schema)


def map_dataframe(
    df: pd.DataFrame,
    template: str | Callable[[dict[str, Any]], Request | str],
    *,
    model: str,
    prefix: str = "llm_",
    on_error: OnError | str = OnError.COLLECT,
    **options: Any,
) -> pd.DataFrame:
    """:func:`amap_dataframe` for synchronous code, Jupyter included (inside a running
    loop the batch runs on a fresh loop in a worker thread)."""
    call = amap_dataframe(df, template, model=model, prefix=prefix, on_error=on_error, **options)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(call)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, call).result()


def result_frame(
    result: BatchResult[Response],
    labels: list[Hashable],
    *,
    prefix: str = "llm_",
    on_error: OnError | str = OnError.COLLECT,
    schema: ResponseSchema[Any] | None = None,
) -> pd.DataFrame:
    """The result columns for *result*, indexed by *labels* (failed rows dropped under
    ``"skip"``); with *schema*, a column per field of the typed answers
    (:func:`result_columns`), each answer dumped in Python mode (by alias)."""
    columns = result_columns(schema)
    skip = failure_strategy(on_error) == failure_strategy(OnError.SKIP)
    records: list[dict[str, Any]] = []
    kept: list[Hashable] = []
    for label, outcome in zip(labels, result.results, strict=True):
        if isinstance(outcome, ItemError):
            if skip:
                continue
            # (the answer's columns, or its fields, are left empty: None)
            records.append(
                {
                    **dict.fromkeys(columns),
                    "error": f"{outcome.error_type}: {outcome.message}",
                    "input_tokens": 0,
                    "output_tokens": 0,
                }
            )
        else:
            record: dict[str, Any] = {
                "error": None,
                "input_tokens": outcome.usage.input_tokens,
                "output_tokens": outcome.usage.output_tokens,
                "cost": outcome.cost,
            }
            if schema is None:
                record["answer"] = outcome.parsed if outcome.parsed is not None else outcome.text
            else:
                fields = answer_fields(outcome.parsed, mode="python")
                record.update(fields if isinstance(fields, dict) else {})
            records.append(record)
        kept.append(label)
    frame = pd.DataFrame.from_records(records, columns=columns)
    frame.index = pd.Index(kept) if kept or not labels else pd.Index([])
    frame = frame.astype({"input_tokens": "int64", "output_tokens": "int64", "cost": "float64"})
    return frame.add_prefix(prefix)


def _row_request(
    template: str | Callable[[dict[str, Any]], Request | str], row: dict[str, Any]
) -> Request | str:
    from llmbatch.client import build_request

    return build_request(template, row)


def _label(label: Hashable) -> str:
    return str(label)


@pd.api.extensions.register_dataframe_accessor("llm")
class LLMAccessor:
    """``df.llm.map(template, model=..., ...)``: :func:`map_dataframe` on this frame;
    ``await df.llm.amap(...)`` in async code."""

    def __init__(self, df: pd.DataFrame) -> None:
        self._df = df

    def map(self, template: Any, *, model: str, **options: Any) -> pd.DataFrame:
        """:func:`map_dataframe` over this DataFrame (``response_model=``: a column per
        field)."""
        return map_dataframe(self._df, template, model=model, **options)

    async def amap(self, template: Any, *, model: str, **options: Any) -> pd.DataFrame:
        """:func:`amap_dataframe` over this DataFrame."""
        return await amap_dataframe(self._df, template, model=model, **options)
