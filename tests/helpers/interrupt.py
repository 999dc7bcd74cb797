"""Stopping a job right after it submitted its batches, as a kill or a Ctrl-C would."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest


class Interrupt:
    """A ``sleep`` for the batch lifecycle that signals its first wait, then blocks
    until the task is cancelled: the process stopped right after submitting."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.waiting.set()
        await asyncio.Event().wait()


async def interrupted(job: Callable[[Interrupt], Awaitable[Any]]) -> None:
    """Start *job* (given the interrupting sleep) and cancel it once it first waits."""
    interrupt = Interrupt()
    task = asyncio.ensure_future(job(interrupt))
    await interrupt.waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
