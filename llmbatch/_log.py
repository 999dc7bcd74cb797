"""How llmbatch logs, as a library should: through the application's choice.

Every module logs structured events (``logger.info("limits.cooldown", seconds=1.5)``)
through :func:`get_logger`. Where they go is the application's decision, never ours:

* an application that configured structlog (``structlog.configure``; the ``llmbatch``
  command line does, and so does ``structlog.testing.capture_logs``) gets them through
  its processors, with the bound context variables;
* otherwise they go to the standard :mod:`logging` logger of the module's name
  (``llmbatch.client``, ``llmbatch.limits``...) as ``event key=value ...`` lines (the
  fields also ride on the record as ``llmbatch_event`` and ``llmbatch_fields``). With no
  logging configured, Python shows only WARNING and above, on stderr: nothing on stdout,
  ever, and a million-item job prints nothing it was not asked for.
  ``logging.basicConfig(level=logging.INFO)`` shows the rest.

Strings that look like API keys or URL passwords are redacted on both paths (the CLI's
own processor does it for structlog; here :func:`~llmbatch.errors.redact`).
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

from llmbatch.errors import redact

__all__ = ["Logger", "get_logger"]


def _render(event: str, fields: dict[str, Any]) -> str:
    parts = [event]
    for name, value in fields.items():
        text = redact(value if isinstance(value, str) else repr(value))
        parts.append(f"{name}={text}")
    return " ".join(parts)


class Logger:
    """A structlog-style logger that defers to the application's configuration.

    Args:
        name: the logger's name (``"llmbatch.client"``).
    """

    __slots__ = ("_proxy", "_stdlib", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._stdlib = logging.getLogger(name)
        self._proxy: Any = structlog.get_logger(name)

    def __repr__(self) -> str:
        return f"<llmbatch Logger {self.name}>"

    def _log(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            getattr(self._proxy, method)(event, **fields)
            return
        if not self._stdlib.isEnabledFor(level):
            return
        merged = {**structlog.contextvars.get_contextvars(), **fields}
        self._stdlib.log(
            level,
            "%s",
            _render(event, merged),
            extra={"llmbatch_event": event, "llmbatch_fields": merged},
        )

    def debug(self, event: str, **fields: Any) -> None:
        """Log *event* at DEBUG."""
        self._log(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """Log *event* at INFO."""
        self._log(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Log *event* at WARNING."""
        self._log(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        """Log *event* at ERROR."""
        self._log(logging.ERROR, "error", event, fields)


def get_logger(name: str) -> Logger:
    """The logger for module *name* (see the module docstring)."""
    return Logger(name)
