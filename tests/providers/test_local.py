"""The embedded local model, for real (SmolLM2-135M through llama-cpp-python).

Marked ``local_model``: skipped when the ``local`` extra is missing, except under
LLMBATCH_REQUIRE_LOCAL=1 (set by .ci/run), where a missing model fails the run.
"""

from __future__ import annotations

import pytest

from llmbatch.client import LLMClient
from llmbatch.errors import ContextLengthExceeded
from llmbatch.models import Request
from llmbatch.providers.local import DEFAULT_MODEL, LocalProvider, default_model_path

pytestmark = pytest.mark.local_model


async def test_local_model_answers_and_reports_usage() -> None:
    """A short prompt gets a non-empty answer with token usage, deterministically."""
    async with LocalProvider(n_ctx=512) as provider:
        request = Request.from_prompt("What is the capital of France?", max_tokens=16)
        first = await provider.complete(request)
        again = await provider.complete(request)
    assert first.text.strip()
    assert first.text == again.text  # temperature 0, fixed seed
    assert (DEFAULT_MODEL, True, True) == (
        first.model,
        first.usage.input_tokens > 0,
        0 < first.usage.output_tokens <= 16,
    )


async def test_local_model_through_the_client_map() -> None:
    """Several requests through LLMClient.map are served one at a time, in order."""
    async with LLMClient(LocalProvider(n_ctx=512), model=DEFAULT_MODEL, max_tokens=8) as client:
        result = await client.map([Request.from_prompt(f"Count to {i}.") for i in (1, 2, 3)])
    assert 3 == result.succeeded
    assert all(r.text for r in result.ok)


async def test_prompt_beyond_the_context_window_is_a_permanent_error() -> None:
    """A prompt longer than n_ctx fails that item with ContextLengthExceeded."""
    async with LocalProvider(n_ctx=64) as provider:
        with pytest.raises(ContextLengthExceeded):
            await provider.complete(Request.from_prompt("word " * 400, max_tokens=8))


def test_model_file_is_found_without_importing_llm() -> None:
    """The GGUF is located through importlib, and is a real file."""
    import sys

    path = default_model_path()
    assert path.suffix == ".gguf"
    assert path.stat().st_size > 10_000_000
    assert "llm" not in sys.modules
