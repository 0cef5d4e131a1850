"""Shared checks for the property-based parser tests (tests/test_*_property.py).

`bounded(call)` runs one parser call under two alarms and `tracemalloc`, so a hang or a large Python
allocation fails the example instead of stalling or swapping the machine; it returns the parser's result or
the ldmtool error it raised (any other exception propagates, and fails the test). The tight bound is on the
process's CPU time (a runaway parser burns CPU), so a machine loaded by other work cannot fail it; a
wall-clock bound, twelve times wider, catches a call blocked without using the CPU.
"""
from __future__ import annotations

import signal
import tracemalloc
from typing import Callable, Optional, TypeVar, Union

from ldmtool.errors import LdmError

T = TypeVar("T")
SECONDS = 5.0  # CPU seconds
WALL_FACTOR = 12
PEAK_BYTES = 32 << 20


def bounded(call: Callable[[], T], *, seconds: float = SECONDS, peak_bytes: Optional[int] = PEAK_BYTES) -> Union[T, LdmError]:
    """`call()`'s result or its LdmError, after checking it took under `seconds` and allocated (in Python
    objects) under `peak_bytes` at its peak (None: not traced; tracing makes deep recursion many times slower)."""
    def timeout(signum: int, frame: object) -> None:
        spent = "CPU seconds" if signum == signal.SIGPROF else "s of wall-clock time"
        limit = seconds if signum == signal.SIGPROF else seconds * WALL_FACTOR
        raise TimeoutError(f"the parser was still running after {limit:g} {spent}")

    previous = {sig: signal.signal(sig, timeout) for sig in (signal.SIGPROF, signal.SIGALRM)}
    signal.setitimer(signal.ITIMER_PROF, seconds)
    signal.setitimer(signal.ITIMER_REAL, seconds * WALL_FACTOR)
    if peak_bytes is not None:
        tracemalloc.start()
    try:
        try:
            outcome: Union[T, LdmError] = call()
        except LdmError as err:
            outcome = err
        except TimeoutError as err:  # re-raised here: pytest cannot show the C frame the alarm interrupted
            raise AssertionError(str(err)) from None
        peak = tracemalloc.get_traced_memory()[1] if peak_bytes is not None else 0
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert peak_bytes is None or peak < peak_bytes, f"the parser allocated {peak} bytes at its peak (bound {peak_bytes})"
    return outcome


def assert_clear(err: LdmError, kind: type[LdmError], *named: str) -> None:
    """`err` is of `kind`, its message one non-empty line naming each of `named` (a file, an option)."""
    assert isinstance(err, kind), f"{type(err).__name__} instead of {kind.__name__}: {err}"
    message = str(err)
    assert message.strip(), "an empty error message"
    assert "\n" not in message and "\r" not in message, f"a message of several lines: {message!r}"
    for name in named:
        assert name in message, f"{name!r} not named in {message!r}"
