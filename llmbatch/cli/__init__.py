"""The ``llmbatch`` command line: ``run``, ``estimate``, ``status``, ``limits``, ``serve-sim``.

The only package that configures logging and draws on the terminal. Each command is
a thin shell over library functions (:mod:`llmbatch.job`, :mod:`llmbatch.providers`):
``run`` (:mod:`.run`), ``estimate`` (:mod:`.estimate`), ``status`` and ``batch``
(:mod:`.status`), ``limits`` (:mod:`.limits`), and ``serve-sim`` (the simulator, loaded
only when asked for).

Exit codes (``llmbatch run``):

====  ===============================================================================
0     every record answered
1     the run finished, and some records failed (their error lines are in the output)
2     the run was aborted (a fatal error such as a rejected key or an exhausted quota,
      the budget, fail-fast) or could not start (bad usage, a store of another job)
130   interrupted (Ctrl-C); 143 terminated (SIGTERM). Everything finished is kept:
      rerun the same command to continue.
====  ===============================================================================
"""

from __future__ import annotations

import click

from llmbatch.cli._common import EXIT_ABORTED, configure_logging, redact_secrets

__all__ = ["cli", "configure_logging", "main", "redact_secrets"]

#: commands and the module that defines each, imported when the command is used
_COMMANDS = {
    "run": ("llmbatch.cli.run", "run"),
    "estimate": ("llmbatch.cli.estimate", "estimate"),
    "status": ("llmbatch.cli.status", "status"),
    "limits": ("llmbatch.cli.limits", "limits"),
    "batch": ("llmbatch.cli.status", "batch"),
    "serve-sim": ("llmbatch.testing._cli", "serve_sim"),
}


class _Commands(click.Group):
    """A group whose commands are imported when used: ``llmbatch run`` does not pay
    for the simulator's imports, nor ``llmbatch status`` for the provider SDKs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = _COMMANDS.get(cmd_name)
        if found is None:
            return None
        import importlib

        command: click.Command = getattr(importlib.import_module(found[0]), found[1])
        return command


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmbatch")
def cli() -> None:
    """Run many LLM calls as fast as the provider's limits allow, resumably."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``llmbatch`` script; returns the exit code."""
    try:
        cli.main(args=argv, prog_name="llmbatch", standalone_mode=True)  # exits
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_ABORTED
