"""Fixtures for the data-job integrations: a simulator served from its own thread, for
code that blocks the test's thread (a synchronous DataFrame call, a Ray driver)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from llmbatch.testing import Simulator
from llmbatch.testing.simulator import SimulatorConfig


class ThreadedSimulator:
    """A :class:`Simulator` running on an event loop in a daemon thread."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.sim = Simulator(config)
        asyncio.run_coroutine_threadsafe(self.sim.start(), self._loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sim.aclose(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


@pytest.fixture
def threaded_simulator() -> Iterator[Simulator]:
    """A default simulator whose server keeps answering while the test's thread blocks."""
    served = ThreadedSimulator(SimulatorConfig())
    try:
        yield served.sim
    finally:
        served.close()


@pytest.fixture
def threaded_simulator_factory() -> Iterator[Callable[..., Simulator]]:
    """Start threaded simulators with any configuration; all are closed after the test."""
    started: list[ThreadedSimulator] = []

    def start(**options: Any) -> Simulator:
        served = ThreadedSimulator(SimulatorConfig(**options))
        started.append(served)
        return served.sim

    try:
        yield start
    finally:
        for served in reversed(started):
            served.close()
