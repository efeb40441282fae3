"""The Transport: the one executor every mover of a runtime submits to.

The layer pipeline, the expert cache, the paged KV cache's spill reads and the GPU's host
staging submit their reads here, and encoded Units their decodes; each gets a Ticket. One
count of reads submitted and not finished (``pending``) answers "is the disk idle?" for every
consumer (the expert predictor reads a guess only then), and one ``wait`` is where compute
blocks on a transfer, recording the stall per consumer (``layers``, ``experts``, ``kv``).

Reads run on ``io_threads`` threads (a thread pool: joined at exit) taking jobs by priority,
then submission order (each submission queues one turn of a thread, which runs the best job
waiting then):
``now`` (a computation waits for it: an expert a layer routed to), ``ahead`` (the pipeline's
window), ``guess`` (a predicted expert; cancellable until it starts). Decodes run on one
decode thread of their own: decoding in an I/O thread kept it from starting its next read
(measured: fewer reads in flight while Units decoded).
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from .base import Ticket

# The pipeline's reads in flight at most: more than a few concurrent reads lose bandwidth on
# this class of disk (measured).
MAX_LAYER_READS = 4

PRIORITIES = {"now": 0, "ahead": 1, "guess": 2}


class Transport:
    """One runtime's reads and decodes.

    Args:
        io_threads: reads in flight at once (more than a few lose bandwidth on this class of
            disk, measured).
    """

    def __init__(self, io_threads: int):
        self.io_threads = max(1, int(io_threads))
        self.stall: dict[str, float] = defaultdict(float)   # consumer -> seconds waited
        self.waits: dict[str, int] = defaultdict(int)
        self.submitted: dict[str, int] = defaultdict(int)   # consumer -> reads submitted
        self._lock = threading.Lock()
        self._heap: list = []
        self._order = itertools.count()
        self._pending = 0
        self._closed = False
        self._decoder: ThreadPoolExecutor | None = None
        self._pool = ThreadPoolExecutor(max_workers=self.io_threads,
                                        thread_name_prefix="offload-io")

    # -- submitting -----------------------------------------------------------------------
    def submit(self, fn: Callable, *args, key: str, nbytes: int, consumer: str,
               priority: str = "ahead") -> Ticket:
        """Run ``fn(*args)`` (a read: it returns the seconds it spent in I/O) on an I/O
        thread; counted in ``pending`` until it finishes or is cancelled."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("this runtime's transport is closed")
            self._pending += 1
            self.submitted[consumer] += 1
            heapq.heappush(self._heap, (PRIORITIES[priority], next(self._order), fn, args,
                                        future))
        future.add_done_callback(self._finished)
        self._pool.submit(self._run_best)
        return Ticket(key, nbytes, future)

    def read(self, disk, unit, dest, *, verify: bool, consumer: str,
             priority: str = "ahead") -> Ticket:
        """``disk.read(unit, dest, verify)`` on an I/O thread (the stored bytes move)."""
        return self.submit(disk.read, unit, dest, verify, key=unit.key,
                           nbytes=unit.stored_bytes, consumer=consumer, priority=priority)

    def then(self, ticket: Ticket, fn: Callable, *args) -> Ticket:
        """Run ``fn(*args)`` on the decode thread once ``ticket``'s read finished; the new
        Ticket carries the read's I/O seconds, or the first error of the two."""
        done: Future = Future()
        if self._decoder is None:
            self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-decode")
        decoder = self._decoder

        def run(read_s: float) -> None:
            if not done.set_running_or_notify_cancel():
                return
            try:
                fn(*args)
            except BaseException as e:   # reported by ``wait``, on the compute thread
                done.set_exception(e)
                return
            done.set_result(read_s)

        def after(f: Future) -> None:
            error = f.exception() if not f.cancelled() else RuntimeError("read cancelled")
            if error is None:
                try:
                    decoder.submit(run, f.result())
                    return
                except RuntimeError as e:   # closed (or the interpreter exiting)
                    error = e
            if done.set_running_or_notify_cancel():
                done.set_exception(error)

        ticket._future.add_done_callback(after)
        return Ticket(ticket.key, ticket.nbytes, done)

    def decode(self, fn: Callable, *args, key: str, nbytes: int) -> Ticket:
        """Run ``fn(*args)`` (a decode from memory: nothing to read) on the decode thread, in
        order with the decodes that follow reads; the Ticket's I/O seconds are 0."""
        read: Future = Future()
        read.set_result(0.0)
        return self.then(Ticket(key, nbytes, read), fn, *args)

    # -- waiting --------------------------------------------------------------------------
    def wait(self, ticket: Ticket, consumer: str) -> float:
        """Block until ``ticket`` is done; the seconds blocked count as ``consumer``'s stall.
        Returns the transfer's I/O seconds; raises what it raised."""
        t0 = time.perf_counter()
        try:
            return ticket.wait()
        finally:
            self.stall[consumer] += time.perf_counter() - t0
            self.waits[consumer] += 1

    @property
    def pending(self) -> int:
        """Reads submitted by every consumer and not finished (queued or running)."""
        return self._pending

    def idle(self) -> bool:
        """A read submitted now would start at once (a thread is free)."""
        return self._pending < self.io_threads

    # -- workers --------------------------------------------------------------------------
    def _finished(self, future: Future) -> None:
        with self._lock:
            self._pending -= 1

    def _run_best(self) -> None:
        """One thread's turn: the most urgent job waiting (one was queued for this turn)."""
        with self._lock:
            _, _, fn, args, future = heapq.heappop(self._heap)
        if not future.set_running_or_notify_cancel():
            return   # cancelled while queued
        try:
            future.set_result(fn(*args))
        except BaseException as e:   # reported by ``wait``
            future.set_exception(e)

    @property
    def threads(self) -> list[threading.Thread]:
        """The I/O threads started so far."""
        return list(self._pool._threads)

    def close(self) -> None:
        """Finish what was submitted, then stop the threads."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)
