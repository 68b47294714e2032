"""The select loop both servers run on: a wake-up from another thread is never lost."""
from __future__ import annotations

import threading
import time

from tcpinfo.servers.selectloop import Loop


class WakeAtRead:
    """The loop's real wake-up socket, with one twist: the first read is preceded by a wake() from
    the test's thread, as another thread's wake-up lands just before the loop reads the socket
    on a loaded machine (the loop thread descheduled between releasing the GIL and the read)."""

    def __init__(self, loop: Loop) -> None:
        self._loop, self._sock = loop, loop._wake_r
        self.raced = threading.Event()

    def recv(self, n: int) -> bytes:
        if not self.raced.is_set():
            done = threading.Event()
            threading.Thread(target=lambda: (self._loop.wake(), done.set())).start()
            done.wait(5)
            self.raced.set()
        return self._sock.recv(n)

    def close(self) -> None:
        self._sock.close()


def test_a_wake_that_lands_just_before_the_loop_reads_is_not_lost():
    seen: list[int] = []
    latest = [0]
    loop = Loop("wake-race", lambda: seen.append(latest[0]))
    racing = WakeAtRead(loop)
    loop._wake_r = racing
    loop.start()
    try:
        latest[0] = 1
        loop.wake()                       # the loop reads, racing another wake-up
        assert racing.raced.wait(5)
        deadline = time.monotonic() + 2
        while seen[-1:] != [1] and time.monotonic() < deadline:
            time.sleep(0.001)
        latest[0] = 2                     # later work, announced once the race is over
        loop.wake()
        deadline = time.monotonic() + 2
        while seen[-1:] != [2] and time.monotonic() < deadline:
            time.sleep(0.001)
        assert seen[-1:] == [2], f"the loop never woke for the later work (saw {seen})"
    finally:
        loop.stop()
        loop.join(5)
