"""Example budgets of the adversarial suite, and guards its properties share.

CI runs each property on a small, derandomized budget (the suite adds about
a minute and a half on two cores). PARALLAX_ADVERSARIAL_EXAMPLES=N raises
every budget to N, with fresh random inputs each run: the deeper pass to run
by hand after changing what these tests cover.
"""
import contextlib
import os
import signal

from hypothesis import HealthCheck, settings

_EXPLORE = int(os.environ.get("PARALLAX_ADVERSARIAL_EXAMPLES", "0"))


def budget(ci_examples: int) -> settings:
    """Hypothesis settings: `ci_examples` derandomized examples, or the exploration budget."""
    if _EXPLORE:
        return settings(max_examples=_EXPLORE, deadline=None, database=None,
                        suppress_health_check=list(HealthCheck))
    return settings(max_examples=ci_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


class Hang(BaseException):
    """Raised in the test when the code under test blocks (a FIFO read, say)."""


@contextlib.contextmanager
def no_hang(seconds: int):
    """Fail with Hang instead of blocking forever (main thread, POSIX)."""
    def alarm(signum, frame):
        raise Hang(f"still running after {seconds} s: blocked?")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
