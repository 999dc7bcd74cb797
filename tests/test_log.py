"""Tests for llmbatch._log: a library that prints nothing unless the application asks."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
from structlog.testing import capture_logs

from llmbatch._log import get_logger

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    import llmbatch
    from llmbatch.errors import ProviderUnavailable
    from llmbatch.providers.fake import FakeProvider
    from llmbatch.retry import RetryPolicy
    from tenacity import wait_fixed

    if sys.argv[1:] == ["info"]:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    failures = [1, 1]

    def handler(request):
        if failures:  # two transient failures: retries, logged at INFO
            failures.pop()
            raise ProviderUnavailable("overloaded")
        return "ok " + request.messages[-1]["content"]

    result = llmbatch.map_sync(
        "{item}", [f"x{i}" for i in range(20)], model="m", provider=FakeProvider(handler),
        limits=llmbatch.Limits(rpm=6000), retry=RetryPolicy(wait=wait_fixed(0)),
    )
    print("answered", result.succeeded)
    """
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=60
    )


def test_a_program_using_llmbatch_prints_only_its_own_output() -> None:
    """``llmbatch.map`` with retries and limiter corrections, logging not configured:
    stdout is exactly the program's own line, and nothing below WARNING reaches
    stderr either."""
    done = run()
    assert 0 == done.returncode, done.stderr
    assert "answered 20\n" == done.stdout
    assert "" == done.stderr


def test_logging_basic_config_shows_the_events() -> None:
    """``logging.basicConfig(level=INFO)``: the events appear on the standard logging
    path, under the ``llmbatch`` logger names."""
    done = run("info")
    assert "answered 20\n" == done.stdout
    assert "INFO:llmbatch.retry:retry.scheduled" in done.stderr


def test_the_standard_logging_path_redacts_keys(caplog: pytest.LogCaptureFixture) -> None:
    """An API key in a field is redacted on the standard logging path too, and the
    event and its fields ride on the record for structured handlers."""
    logger = get_logger("llmbatch.test")
    with caplog.at_level(logging.INFO, logger="llmbatch.test"):
        logger.info("client.event", key="sk-proj-abcdefghijklmnop1234", count=3)
    record = caplog.records[-1]
    assert "client.event key=sk-proj-…1234 count=3" == record.getMessage()
    assert "client.event" == record.llmbatch_event  # type: ignore[attr-defined]
    assert 3 == record.llmbatch_fields["count"]  # type: ignore[attr-defined]


def test_a_structlog_setup_gets_the_events() -> None:
    """An application that configured structlog gets the events through it."""
    with capture_logs() as logs:
        get_logger("llmbatch.test").warning("limits.cooldown", seconds=1.5)
    assert [{"event": "limits.cooldown", "seconds": 1.5, "log_level": "warning"}] == logs
