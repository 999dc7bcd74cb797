"""The ``llmbatch`` command line (placeholder until the CLI issue lands)."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``llmbatch`` script."""
    print("llmbatch: the command line is not built yet", file=sys.stderr)
    return 2
