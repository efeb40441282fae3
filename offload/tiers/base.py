"""Tickets: what every asynchronous transfer returns."""
from __future__ import annotations

import time
from concurrent.futures import Future


class Ticket:
    """A transfer in flight (like kvikio's IOFuture): ``wait()`` blocks until it is done.

    Attributes:
        key: the Unit being moved.
        nbytes: bytes moved.
        submitted: ``time.perf_counter()`` at submission.
    """

    __slots__ = ("key", "nbytes", "submitted", "_future")

    def __init__(self, key: str, nbytes: int, future: Future):
        self.key = key
        self.nbytes = nbytes
        self.submitted = time.perf_counter()
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        """Drop a transfer that has not started; False if it is running or done."""
        return self._future.cancel()

    def wait(self) -> float:
        """Block until the transfer is complete; return the seconds it spent in I/O.

        Raises whatever the transfer raised (a StoreError naming the Unit, an OSError).
        """
        return self._future.result()
