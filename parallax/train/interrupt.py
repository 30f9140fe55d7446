"""Stop a run cleanly on SIGINT / SIGTERM.

The first signal only sets a flag; the loop reads it between steps, saves a
checkpoint and stops, so Ctrl-C or a scheduler's SIGTERM loses no step
(work after the last checkpoint, such as the final sample, stops at once).
A second signal acts at once (KeyboardInterrupt, or the default
termination): the previous checkpoint is still intact.
"""
from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopNow(BaseException):
    """Raised by a stop signal inside `StopRequest.at_once` (a BaseException, as
    KeyboardInterrupt, so no `except Exception` on the way swallows it)."""


class StopRequest:
    """Set by the first stop signal; `signum` says which."""

    def __init__(self):
        self.signum: int | None = None
        self._at_once = False

    def __bool__(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def at_once(self):
        """Within this block a stop signal (or one already received) raises
        StopNow at once: for work that needs no checkpoint, such as the final
        sample, rather than waiting for it to end."""
        if self:
            raise StopNow()
        self._at_once = True
        try:
            yield
        finally:
            self._at_once = False

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


@contextlib.contextmanager
def stop_on_signals():
    """Yield a StopRequest the signals set; handlers are restored on exit.
    Off the main thread (where Python cannot install handlers) it never fires."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    # getsignal is None for a handler installed outside Python: restore the default then.
    previous = {signum: signal.getsignal(signum) or signal.SIG_DFL for signum in STOP_SIGNALS}

    def handler(signum, frame):
        request.signum = signum
        for s, h in previous.items():  # a second signal takes the usual, immediate way
            signal.signal(s, h)
        if request._at_once:
            raise StopNow()

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    try:
        yield request
    finally:
        for signum, h in previous.items():
            signal.signal(signum, h)
