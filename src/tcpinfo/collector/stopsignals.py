"""The signals that stop the collector, caught from the first moment of `tcp-info`.

Upstream handles no signal: SIGTERM kills it mid-write, and any other signal whose default action
ends a process does the same here unless caught.  Every such catchable signal (TERM, INT, HUP,
USR1, USR2, ALRM, QUIT) asks for one clean stop: polling ends, every open flow gets its Close,
every buffer is written, the event socket file is removed, and the exit status is 0.  The handlers
are installed before anything is created (archives, event socket, metrics listener), so no signal
can leave those behind: a signal during start-up lets start-up finish and stops before the first
poll.  A second signal while stopping is caught too, so it cannot cut the flush short.
"""
from __future__ import annotations

import signal
import socket

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGALRM, signal.SIGQUIT)


class StopSignals:
    """Records the first stop signal; `wake` becomes readable when one arrives.

    Python runs a handler only between bytecodes of the main thread, so a loop blocked in
    select() would not see the signal until its timeout: `signal.set_wakeup_fd` makes the
    interpreter write to a socket pair the moment the signal arrives, and the loop waits on it.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.wake, self._wake_w = socket.socketpair()
        self.wake.setblocking(False)
        self._wake_w.setblocking(False)
        self._previous: dict[int, signal._HANDLER] = {}
        self._previous_fd = -1

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        """The stop signal's name, e.g. SIGHUP ('' if none came)."""
        return "" if self.received is None else signal.Signals(self.received).name

    def install(self) -> None:
        """Catches every stop signal from now on (call from the main thread)."""
        self._previous_fd = signal.set_wakeup_fd(self._wake_w.fileno())
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._catch)

    def clear_wake(self) -> None:
        """Empties the wake-up socket after the loop has seen it readable."""
        try:
            while self.wake.recv(4096):
                pass
        except BlockingIOError:
            pass

    def restore(self) -> None:
        """Puts the previous handlers back and closes the wake-up pair."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._previous:
            signal.set_wakeup_fd(self._previous_fd)
        self._previous.clear()
        self.wake.close()
        self._wake_w.close()

    def _catch(self, signum: int, _frame: object) -> None:
        if self.received is None:
            self.received = signum
