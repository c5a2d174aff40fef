"""Stop signals end a run the way Ctrl-C does, and a run that is stopping is not stopped again.

While the `metaagent` command still loads (Ray's import alone takes a second or more) a stop signal
ends the process at once with the "interrupted" line: nothing has started that needs stopping, and
a KeyboardInterrupt raised inside an import can be swallowed there (Ray's Cython modules do).

SIGTERM (systemd, `timeout`, Kubernetes, job schedulers) and SIGHUP (a closed terminal) raise the
same KeyboardInterrupt as SIGINT while a run executes, so every stop takes one path: cancel the
agents, save the record, print the resume command, exit 128 + the signal's number. While that
path runs, further stop signals are ignored, so pressing Ctrl-C again cannot cut it short.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignal(KeyboardInterrupt):
    """A stop signal arrived while a run executed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_last_stop: list[int] = []  # the stop signal that arrived while the current run executed, if one did
_ended: list[bool] = []  # [True] once the current run's agents have all finished: a stop signal changes nothing then


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's code for a process ended by this signal: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP.

    Ray turns an exception raised while it waits into a plain KeyboardInterrupt, so the signal that
    arrived is also kept aside.
    """
    if isinstance(interrupt, StopSignal):
        return 128 + interrupt.signum
    return 128 + (_last_stop[-1] if _last_stop else signal.SIGINT)


def _raise_stop(signum: int, frame: Any) -> None:
    if _ended:
        return
    _last_stop.append(signum)
    raise StopSignal(signum)


def run_ended() -> None:
    """Every agent of the run has finished: from here until the next run starts, a stop signal that reaches
    this module's handler is ignored, so the record, pictures and report are written whole (in `metaagent`
    the handler is in place to the command's end; elsewhere `stop_signals_ignored` guards the writes)."""
    _ended[:] = [True]


@contextlib.contextmanager
def _handlers(handler: Any) -> Iterator[None]:
    """Install `handler` for every stop signal, then restore what was there (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)


def stop_signals_interrupt() -> contextlib.AbstractContextManager[None]:
    """While a run executes: SIGINT, SIGTERM and SIGHUP raise StopSignal in the main thread."""
    _last_stop.clear()
    _ended.clear()
    return _handlers(_raise_stop)


def stop_signals_ignored() -> contextlib.AbstractContextManager[None]:
    """While a stopped run saves what finished and releases Ray: no further signal cuts it short."""
    return _handlers(signal.SIG_IGN)


def _exit_at_once(signum: int, frame: Any) -> None:
    os.write(2, b"error: interrupted\n")
    os._exit(128 + signum)


def exit_while_loading() -> None:
    """Until `command_started`: a stop signal ends the process at once, with the "interrupted" line."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _exit_at_once)


def command_started() -> None:
    """The command's own code runs: from here on every stop signal raises StopSignal wherever it lands
    (starting Ray, planning, the final write), so each phase ends the same way: its "interrupted" line and
    128 + the signal, with Ray's processes stopped. Python's default would let SIGTERM and SIGHUP kill
    the process on the spot, before Ray's processes are stopped."""
    if signal.getsignal(signal.SIGINT) is not _exit_at_once:
        return  # not started by `metaagent` (the CLI called in-process): leave the caller's handlers alone
    _last_stop.clear()
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_stop)


def keeping_handlers(start: Callable[[], T]) -> T:
    """Call `start` (Ray starting in this process) and put the stop-signal handlers from before back:
    Ray installs SIGTERM handlers of its own there (one exits at once with code 15, one prints a crash
    report). A SIGTERM that Ray's handler took meanwhile still ends as StopSignal (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return start()
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        try:
            return start()
        finally:
            for signum, handler in before.items():
                if handler is not None:
                    signal.signal(signum, handler)
    except SystemExit as exit:  # raised by Ray's handler wherever the signal was handled, restoring included
        if exit.code == signal.SIGTERM and before[signal.SIGTERM] is _raise_stop:
            _last_stop.append(signal.SIGTERM)
            raise StopSignal(signal.SIGTERM) from None
        raise
