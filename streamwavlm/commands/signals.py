"""Ctrl-C and SIGTERM for every command: the first asks the command to stop, and the process is gone within
``GRACE`` seconds whatever it is doing.

Python runs a signal handler only in the main thread and only between bytecodes, so a command inside a long
torch call (an offline forward, a step in a worker thread being joined) would not see Ctrl-C until the call
returns. The C-level handler does write the signal number to the wakeup fd at once, though: a watchdog
thread reads it, and if the command has not ended ``GRACE`` seconds after the first signal (or a second
signal comes), it runs the registered emergency cleanups (stop an embedded broker, remove its folder) and
ends the process with 128 + the signal number.

The first signal either raises ``KeyboardInterrupt`` in the main thread (synchronous commands; the CLI turns
it into one line and exit 130) or, for an async command that called :func:`stop_event`, sets that event so
the command ends cleanly (flushes, publishes its offline statuses, prints its summary).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import NoReturn

GRACE = 1.5  # seconds from the first signal to the forced exit; the promise is "within 2 s"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Guard:
    """The installed handlers, the watchdog thread and the cleanups of one command run."""

    def __init__(self, prog: str, grace: float) -> None:
        self.prog = prog
        self.grace = grace
        self.cleanups: list[Callable[[], None]] = []
        self.on_stop: Callable[[], None] | None = None
        self.received: list[int] = []
        self.finished = False  # the command has returned; only the interpreter's exit is left
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous = {s: signal.getsignal(s) for s in SIGNALS}
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for s in SIGNALS:
            signal.signal(s, self._handle)
        threading.Thread(target=self._watch, name="streamwavlm-signals", daemon=True).start()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The Python-level handler (main thread): a graceful stop, once."""
        if len(self.received) > 1:
            return  # the watchdog is already ending the process
        if self.on_stop is None:
            raise KeyboardInterrupt
        try:
            self.on_stop()
        except RuntimeError:  # its event loop has ended: the command is past its async part
            raise KeyboardInterrupt from None

    def _watch(self) -> None:
        """Wait for signal numbers on the wakeup fd; force the exit after a second one or after ``grace``."""
        deadline: float | None = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self._read], [], [], timeout)
            if readable:
                data = os.read(self._read, 64)
                if not data:  # uninstalled before any signal: the pipe was closed
                    os.close(self._read)
                    return
                self.received += [b for b in data if b in SIGNALS]
                if self.received and deadline is None:
                    deadline = time.monotonic() + self.grace
            if len(self.received) > 1 or (deadline is not None and time.monotonic() >= deadline):
                self._force()

    def _force(self) -> None:
        """The command did not stop in time: emergency cleanups, one line, and the exit."""
        signum = self.received[0]
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        name = signal.Signals(signum).name
        if not self.finished:
            print(f"{self.prog}: stopped by {name} (did not finish cleanly within {self.grace:g} s)",
                  file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def uninstall(self) -> None:
        """Restore the previous handlers. The watchdog stays armed if a signal already came: what is left
        of the exit (joining worker threads) is still bounded."""
        self.finished = True
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self._previous_fd)
        if not self.received:
            os.close(self._write)


_guard: _Guard | None = None


@contextlib.contextmanager
def guarded(prog: str, grace: float = GRACE) -> Iterator[Callable[[], bool]]:
    """Install the handlers for the duration of one command (a no-op outside the main thread, e.g. when a
    test calls ``main()`` from a worker thread). Yields a function that tells whether a signal came."""
    global _guard
    if threading.current_thread() is not threading.main_thread() or _guard is not None:
        yield lambda: False
        return
    guard = _guard = _Guard(prog, grace)
    try:
        yield lambda: bool(guard.received)
    finally:
        guard.uninstall()
        _guard = None


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown, once a signal-stopped command has cleaned up:
    with torch loaded that teardown alone takes 0.3-1.5 s (module and object finalisation), which would
    break the 2 s promise; nothing of ours is left for it to do."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rename(prog: str) -> None:
    """The name the forced-exit line starts with, once the command is known."""
    if _guard is not None:
        _guard.prog = prog


def allow(seconds: float) -> None:
    """Give the running command ``seconds`` (when longer than GRACE) from the first signal to the forced
    exit: a worker's drain hands its streams over through the broker, which takes longer than a flush."""
    if _guard is not None:
        _guard.grace = max(_guard.grace, seconds)


def stop_event() -> asyncio.Event:
    """An event the first SIGINT/SIGTERM sets (instead of raising KeyboardInterrupt); call it from the
    running loop of an async command. Without :func:`guarded` (a library caller) it is only set by the
    caller."""
    event = asyncio.Event()
    if _guard is not None:
        loop = asyncio.get_running_loop()
        _guard.on_stop = lambda: loop.call_soon_threadsafe(event.set)
    return event


def on_forced_exit(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Run ``cleanup`` (quick, synchronous) if the process is forced to exit; returns the function that
    unregisters it, for when the resource is released normally."""
    if _guard is None:
        return lambda: None
    guard = _guard
    guard.cleanups.append(cleanup)
    return lambda: guard.cleanups.remove(cleanup) if cleanup in guard.cleanups else None
