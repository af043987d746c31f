"""SIGTERM and SIGINT as an exception, so that a stopped run still cleans up and reports what it finished.

grand-challenge (like `docker stop`) ends a container with SIGTERM and kills it a few seconds later. With
`raising_on_signals()` the signal raises `Terminated` in the main thread at the next Python instruction: the
`finally` blocks run (temporary files are removed) and the caller writes its report, then exits with
128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process killed by it.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Terminated(BaseException):
    """The process received SIGTERM or SIGINT. A BaseException, so `except Exception` does not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalState:
    """What the handler saw: `received` is the first termination signal (None: none yet)."""

    def __init__(self) -> None:
        self.received: int | None = None


@contextlib.contextmanager
def raising_on_signals() -> Iterator[SignalState]:
    """Within the block, the first SIGTERM or SIGINT raises Terminated; later ones are ignored, so that the cleanup
    and the report after it are not interrupted (at most one Terminated is ever raised). Outside the main thread
    (where Python cannot handle signals) it changes nothing."""
    state = SignalState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state.received is None:
            state.received = signum
            raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
