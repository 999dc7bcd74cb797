"""Test doubles shipped with llmbatch, for its own tests and for yours.

* :class:`FakeClock`: virtual time for code that takes ``clock``/``sleep`` or reads the loop's time.
* :class:`FakeProvider`: a provider whose answers come from a function (``handler(request)``),
  as httpx's ``MockTransport(handler)``; the same class as :mod:`llmbatch.providers.fake`'s.
* :class:`Simulator`: a real OpenAI- and Anthropic-compatible HTTP server on 127.0.0.1
  with the providers' rate limits, faults and Batch APIs (configured by
  :class:`SimulatorConfig` and :class:`BatchSimConfig`; scripted faults are :class:`Fault`
  objects; counters come back as :class:`SimulatorStats`).
* pytest fixtures ``simulator`` and ``simulator_factory`` (loaded automatically; see
  :mod:`llmbatch.testing.pytest_plugin`).

The simulator names are imported on first use, so ``import llmbatch.testing`` (which the
pytest plugin does in every test run) stays cheap and does not load the simulator's server.
:class:`FakeProvider` is imported at once: it needs nothing that ``llmbatch`` has not
imported already.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llmbatch.providers.fake import FakeProvider
from llmbatch.testing.clock import FakeClock

if TYPE_CHECKING:
    from llmbatch.testing.simulator import (
        BatchSimConfig,
        Fault,
        RequestInfo,
        Simulator,
        SimulatorConfig,
        SimulatorStats,
    )

__all__ = [
    "BatchSimConfig",
    "FakeClock",
    "FakeProvider",
    "Fault",
    "RequestInfo",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
]

#: names imported from their module on first access
_LAZY = dict.fromkeys(
    ("BatchSimConfig", "Fault", "RequestInfo", "Simulator", "SimulatorConfig", "SimulatorStats"),
    "llmbatch.testing.simulator",
)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
