"""The public API is pinned: ``llmbatch.__all__`` is sorted, complete and importable."""

from __future__ import annotations

import importlib

import pytest

import llmbatch

PUBLIC_MODULES = [
    "llmbatch.batchapi",
    "llmbatch.cli",
    "llmbatch.client",
    "llmbatch.config",
    "llmbatch.io",
    "llmbatch.job",
    "llmbatch.routing",
    "llmbatch.store",
    "llmbatch.errors",
    "llmbatch.limits",
    "llmbatch.limits_redis",
    "llmbatch.models",
    "llmbatch.providers.anthropic",
    "llmbatch.providers.fake",
    "llmbatch.providers.openai",
    "llmbatch.retry",
    "llmbatch.tokens",
    "llmbatch.failure",
    "llmbatch.flow",
    "llmbatch.runner",
    "llmbatch.compat.pocketflow",
]


def _isort_key(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 keeps: CONSTANTS, then Classes, then everything else."""
    if name.isupper() and len(name) > 1:
        return 0, name
    return (1 if name[:1].isupper() else 2), name


def test_all_is_sorted_and_unique() -> None:
    """``__all__`` is sorted the way ruff's RUF022 sorts it and has no duplicates."""
    assert sorted(set(llmbatch.__all__), key=_isort_key) == llmbatch.__all__


def test_every_exported_name_exists_and_claims_a_public_home() -> None:
    """Every name in ``__all__`` resolves, and classes/functions live in a public module."""
    for name in llmbatch.__all__:
        member = getattr(llmbatch, name)
        module = getattr(member, "__module__", None)
        if module is not None and name != "__version__":
            assert module.startswith("llmbatch"), name
            assert not any(part.startswith("_") for part in module.split(".")), (name, module)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_submodule_all_names_resolve(module_name: str) -> None:
    """Each public submodule's ``__all__`` is sorted and every name in it exists."""
    module = importlib.import_module(module_name)
    assert sorted(module.__all__, key=_isort_key) == module.__all__
    for name in module.__all__:
        assert hasattr(module, name), f"{module_name}.{name}"


def test_flow_classes_are_all_reexported() -> None:
    """Every flow primitive is importable from the top-level package."""
    flow = importlib.import_module("llmbatch.flow")
    assert set(flow.__all__) <= set(llmbatch.__all__)
