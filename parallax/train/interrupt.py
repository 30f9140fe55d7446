"""Stop a run cleanly on SIGINT / SIGTERM.

The first signal only sets a flag; the loop reads it between steps, saves a
checkpoint and stops, so Ctrl-C or a scheduler's SIGTERM loses no step. A
second signal acts at once (KeyboardInterrupt, or the default termination):
the previous checkpoint is still intact.
"""
from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by the first stop signal; `signum` says which."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

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

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    try:
        yield request
    finally:
        for signum, h in previous.items():
            signal.signal(signum, h)
