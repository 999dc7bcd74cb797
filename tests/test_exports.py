"""The public API is pinned: ``llmbatch.__all__`` is sorted, complete and importable, and
every exception llmbatch defines belongs to its one error tree."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import pytest

import llmbatch
import llmbatch.errors
import llmbatch.testing
from llmbatch.errors import LLMBatchError

#: what ``from llmbatch import *`` gives; a change here is a change of the public API
LLMBATCH_ALL = [
    "AsyncBatchFlow",
    "AsyncBatchNode",
    "AsyncFlow",
    "AsyncNode",
    "AsyncParallelBatchFlow",
    "AsyncParallelBatchNode",
    "AuthenticationFailed",
    "BadRequest",
    "BaseNode",
    "BatchExpired",
    "BatchFailed",
    "BatchFlow",
    "BatchNode",
    "BatchResult",
    "BatchStream",
    "BudgetExhausted",
    "CollectErrors",
    "ConfigurationError",
    "ConnectionFailed",
    "ContentFiltered",
    "ContextLengthExceeded",
    "Embedding",
    "EmbeddingRequest",
    "FailFast",
    "FailureStrategy",
    "FatalError",
    "FinishPolicy",
    "Flow",
    "InvalidOutput",
    "ItemError",
    "JobMismatch",
    "LLMBatchError",
    "LLMClient",
    "LLMParallelBatchNode",
    "LimiterUnavailable",
    "Limits",
    "Node",
    "NotFound",
    "OnError",
    "Outcome",
    "PermanentError",
    "ProviderUnavailable",
    "ProviderUnreachable",
    "QuotaExhausted",
    "RateLimited",
    "RateLimiter",
    "Request",
    "RequestTooLarge",
    "Response",
    "ResponseSchema",
    "RetryPolicy",
    "Skip",
    "Timeout",
    "TokenizerUnavailable",
    "TransientError",
    "Usage",
    "__version__",
    "current_item",
    "get_limiter",
    "imap",
    "map",
    "map_sync",
    "run_batch",
    "stream_batch",
]

#: the test doubles users get from ``llmbatch.testing``
TESTING_ALL = [
    "BatchSimConfig",
    "FakeClock",
    "FakeProvider",
    "Fault",
    "RequestInfo",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
]

#: exceptions that are not llmbatch errors on purpose: the simulator server's error
#: answers, raised and caught inside its request handlers and sent as HTTP responses
#: (they never reach a caller of llmbatch)
NOT_LIBRARY_ERRORS = {
    "llmbatch.testing._batchsim._Reject",
    "llmbatch.testing._endpoint.ApiError",
    "llmbatch.testing._gemini.GoogleError",
    # the simulator's own reasons to answer 400 to a response_format or tool schema
    "llmbatch.testing._schema.SchemaError",
    "llmbatch.testing._schema._Unsupported",
    "llmbatch.testing._structured.FormatError",
}


def _all_modules() -> list[str]:
    """Every module of the package, found by walking it (``__main__`` runs the CLI: left out)."""
    found = pkgutil.walk_packages(llmbatch.__path__, "llmbatch.")
    return ["llmbatch", *sorted(m.name for m in found if not m.name.endswith(".__main__"))]


ALL_MODULES = _all_modules()
PUBLIC_MODULES = [
    name for name in ALL_MODULES if not any(part.startswith("_") for part in name.split("."))
]


def _import(name: str) -> ModuleType:
    """Import *name*, skipping the test when an optional dependency is not installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "llmbatch":
            raise
        pytest.skip(f"{name} needs {exc.name}")


def _isort_key(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 keeps: CONSTANTS, then Classes, then everything else."""
    if name.isupper() and len(name) > 1:
        return 0, name
    return (1 if name[:1].isupper() else 2), name


def test_llmbatch_all_is_pinned() -> None:
    """``llmbatch.__all__`` is exactly the public API above (sorted as RUF022 sorts)."""
    assert LLMBATCH_ALL == llmbatch.__all__
    assert sorted(set(LLMBATCH_ALL), key=_isort_key) == LLMBATCH_ALL


def test_testing_all_is_pinned() -> None:
    """``llmbatch.testing.__all__`` is exactly the test doubles above, and each resolves
    (the simulator names lazily)."""
    assert TESTING_ALL == llmbatch.testing.__all__
    for name in TESTING_ALL:
        assert getattr(llmbatch.testing, name).__name__ == name
    assert set(TESTING_ALL) <= set(dir(llmbatch.testing))


def test_every_exported_name_exists_and_claims_a_public_home() -> None:
    """Every name in ``__all__`` resolves, and classes/functions live in a public module."""
    for name in llmbatch.__all__:
        member = getattr(llmbatch, name)
        module = getattr(member, "__module__", None)
        if module is not None and name != "__version__":
            assert module.startswith("llmbatch"), name
            assert not any(part.startswith("_") for part in module.split(".")), (name, module)


def test_the_one_call_api_is_at_the_top() -> None:
    """``llmbatch.map``, ``llmbatch.imap`` and ``llmbatch.map_sync`` exist (as the README
    shows them)."""
    assert ["map", "imap", "map_sync"] == [
        llmbatch.map.__name__,
        llmbatch.imap.__name__,
        llmbatch.map_sync.__name__,
    ]


def test_every_error_class_is_exported() -> None:
    """Every exception of ``llmbatch.errors`` can be caught as ``llmbatch.<Name>``."""
    errors = [
        name for name in llmbatch.errors.__all__ if isinstance(getattr(llmbatch.errors, name), type)
    ]
    assert [] == [name for name in errors if getattr(llmbatch, name, None) is None]
    for name in errors:
        assert getattr(llmbatch.errors, name) is getattr(llmbatch, name)


def test_fake_provider_is_where_users_look() -> None:
    """``llmbatch.testing.FakeProvider`` is the provider of ``llmbatch.providers.fake``."""
    from llmbatch.providers.fake import FakeProvider

    assert FakeProvider is llmbatch.testing.FakeProvider


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_submodule_all_names_resolve(module_name: str) -> None:
    """Each public module's ``__all__`` is sorted and every name in it exists; only a
    package that merely groups modules (``llmbatch.providers``) may have none."""
    module = _import(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        assert hasattr(module, "__path__"), f"{module_name} has no __all__"
        return
    assert sorted(names, key=_isort_key) == names
    for name in names:
        assert hasattr(module, name), f"{module_name}.{name}"


@pytest.mark.parametrize("module_name", ALL_MODULES)
def test_every_exception_class_is_in_the_error_tree(module_name: str) -> None:
    """Every exception class defined anywhere in llmbatch derives from LLMBatchError, so
    ``except llmbatch.LLMBatchError`` catches everything llmbatch raises on purpose."""
    module = _import(module_name)
    strays = [
        f"{module_name}.{name}"
        for name, obj in vars(module).items()
        if isinstance(obj, type)
        and issubclass(obj, BaseException)
        and not issubclass(obj, (LLMBatchError, Warning))
        and obj.__module__ == module_name
    ]
    assert [] == [name for name in strays if name not in NOT_LIBRARY_ERRORS]


def test_the_walk_finds_the_error_modules() -> None:
    """The module walk reaches the modules that define errors (it is not vacuous), and
    each exception exempted above still exists outside the tree (the list does not rot)."""
    assert {"llmbatch.errors", "llmbatch.failure", "llmbatch.testing._endpoint"} <= set(ALL_MODULES)
    for qualified in sorted(NOT_LIBRARY_ERRORS):
        module_name, name = qualified.rsplit(".", 1)
        exc_class = getattr(importlib.import_module(module_name), name)
        assert issubclass(exc_class, Exception)
        assert not issubclass(exc_class, LLMBatchError)


def test_flow_classes_are_all_reexported() -> None:
    """Every flow primitive is importable from the top-level package."""
    flow = importlib.import_module("llmbatch.flow")
    assert set(flow.__all__) <= set(llmbatch.__all__)
