"""Shared test configuration."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from llmbatch.testing import Simulator
from llmbatch.testing.simulator import SimulatorConfig


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip local-model tests when the `local` extra is missing, unless it is required."""
    from llmbatch.providers.local import local_model_available

    if local_model_available():
        return
    if os.environ.get("LLMBATCH_REQUIRE_LOCAL") == "1":
        raise pytest.UsageError(
            "LLMBATCH_REQUIRE_LOCAL=1 but the local model is not installed (scripts/install)"
        )
    skip = pytest.mark.skip(reason="the `local` extra is not installed")
    for item in items:
        if "local_model" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _own_cache_folder(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test its own user cache folder: ``llmbatch run`` caches answers there by
    default, and one test's answers must not be another's hits (subprocesses inherit
    the variable)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("LLMBATCH_CACHE", raising=False)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Every test starts from structlog's defaults (only applications configure logging)."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@contextlib.contextmanager
def redis_server(workdir: Path, *, password: str | None = None) -> Iterator[str]:
    """A real redis-server on a free 127.0.0.1 port; its URL (with the password, if any)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed: run scripts/install (apt-get install redis-server)"
        )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--dir", str(workdir)]
    if password is not None:
        args += ["--requirepass", password]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                        break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("redis-server did not start")
                time.sleep(0.02)
        secret = "" if password is None else f":{password}@"
        yield f"redis://{secret}127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on 127.0.0.1 for the whole session (installed by scripts/install)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


#: the password of :func:`redis_password_url`'s server (tests check it never leaks)
REDIS_PASSWORD = "redis-CANARY-password-7c1e9"


@pytest.fixture(scope="session")
def redis_password() -> str:
    """The password of :func:`redis_password_url`'s server (tests check it never leaks)."""
    return REDIS_PASSWORD


@pytest.fixture(scope="session")
def redis_password_url(
    tmp_path_factory: pytest.TempPathFactory, redis_password: str
) -> Iterator[str]:
    """A second real redis-server that requires :func:`redis_password`."""
    with redis_server(tmp_path_factory.mktemp("redis-auth"), password=redis_password) as url:
        yield url


# -- a simulator served from its own thread, for code that blocks the test's thread --
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
