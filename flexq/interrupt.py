"""Ctrl-C that always stops a long-running command, even when a library swallows one cancellation."""

from __future__ import annotations

import asyncio
from typing import Any


class Interrupt:
    """A SIGINT handler for the main task: ``asyncio.run`` cancels it once, and a library that swallows
    that cancellation would leave the command running until a second Ctrl-C. This cancels again every
    half second until the command says it is ``closing``, then lets the clean-up finish."""

    RECANCEL_S = 0.5

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.requested = False
        self.closing = False

    def __call__(self) -> None:
        self.requested = True
        if not self.task.done() and not self.closing:
            self.task.cancel()
            asyncio.get_running_loop().call_later(self.RECANCEL_S, self)
