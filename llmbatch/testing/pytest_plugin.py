"""pytest fixtures shipped with llmbatch (auto-loaded through the ``pytest11`` entry point).

* ``simulator``: a started :class:`~llmbatch.testing.Simulator` with the default
  configuration (no rate limits, no latency, no faults), closed after the test::

      async def test_summary(simulator):
          client = openai.AsyncOpenAI(base_url=simulator.base_url, api_key="sk-test")

* ``simulator_factory``: ``await simulator_factory(rpm=60, tpm=10_000, clock=clock)``
  starts a simulator with that configuration (the arguments of ``Simulator``); every
  simulator it started is closed after the test. Annotate it as :class:`SimulatorFactory`.

The fixtures are async, so they need pytest-asyncio (any mode); without it they are not
defined. This module is imported in every pytest run, so it imports the simulator (and
``aiohttp``) only when a fixture is used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from llmbatch.testing.simulator import Simulator, SimulatorConfig

__all__ = ["SimulatorFactory"]

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixtures need pytest-asyncio
    HAVE_PYTEST_ASYNCIO = False
else:
    HAVE_PYTEST_ASYNCIO = True


class SimulatorFactory(Protocol):
    """The ``simulator_factory`` fixture: starts a :class:`Simulator` from its arguments."""

    async def __call__(
        self, config: SimulatorConfig | None = None, /, **options: Any
    ) -> Simulator: ...


if HAVE_PYTEST_ASYNCIO:

    @pytest_asyncio.fixture
    async def simulator() -> AsyncIterator[Simulator]:
        """A started simulator with the default configuration."""
        from llmbatch.testing.simulator import Simulator

        async with Simulator() as sim:
            yield sim

    @pytest_asyncio.fixture
    async def simulator_factory() -> AsyncIterator[SimulatorFactory]:
        """Start simulators with any configuration; all are closed after the test."""
        from llmbatch.testing.simulator import Simulator

        started: list[Simulator] = []

        async def start(config: SimulatorConfig | None = None, /, **options: Any) -> Simulator:
            sim = Simulator(config, **options)
            await sim.start()
            started.append(sim)
            return sim

        try:
            yield start
        finally:
            for sim in reversed(started):
                await sim.aclose()
