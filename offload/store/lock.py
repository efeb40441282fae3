"""Locks that let several offload processes share one offload dir.

Two kinds, both ``flock`` on a small file beside the stores, so the kernel drops a lock when
its process dies and a dead process's lock file is simply taken over (it holds a PID only to
name the holder in the waiting message):

- ``exclusive(path)``: one process packs a store; the others wait for it, then reuse it.
- ``DiskUsers(dir)``: every process that reads an offload dir's stores holds it shared while it
  runs; ``disk_idle(dir)`` asks whether any other process holds it, so a hardware profile is
  never measured (and cached) while another run competes for the same disk.

An ``flock`` belongs to an open file, not to a process: a process that holds the shared lock
through one descriptor and asks ``disk_idle`` through another sees itself as busy, so a runtime
takes its shared lock only after its profile was measured.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path

from ..errors import HardwareError

log = logging.getLogger(__name__)

BUSY_FILE = ".disk-users.lock"


def _lock_path(store_dir: Path) -> Path:
    return store_dir.parent / f".{store_dir.name}.lock"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return "another process"
    return f"process {pid}" if pid.isdigit() else "another process"


def _locked(path: Path, operation: int) -> int:
    """A descriptor of ``path`` (created if missing) holding the ``flock`` ``operation``.

    A lock file is removed by the last process to release it (``_release``), so one can be
    unlinked between our ``open`` and our lock: we then hold a lock nobody else sees. After
    locking, the path must still name the file we locked; if not, try again.

    Raises:
        BlockingIOError: ``operation`` has ``LOCK_NB`` and another process holds the lock.
        OSError: the file cannot be created.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, operation)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:   # unlinked after our lock: another file is the lock now
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _release(fd: int, path: Path) -> None:
    """Release the lock of ``fd``, removing ``path`` if no other process holds or waits for
    it (a waiter re-checks the path, ``_locked``)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except OSError:   # another process holds it (shared) or the file is gone: leave it
        pass
    finally:
        os.close(fd)


def _open_lock(path: Path, operation: int) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _locked(path, operation)
    except BlockingIOError:
        raise
    except OSError as e:
        raise HardwareError(f"cannot create the offload dir {path.parent}: {e.strerror or e}; "
                            "choose a writable --offload-dir", path=str(path.parent)) from e


@contextlib.contextmanager
def exclusive(store_dir: Path, *, what: str = "packing", on_wait=None):
    """Hold the lock of ``store_dir`` (a file beside it) for the body; wait while another
    process holds it. ``on_wait(message)`` is called once before waiting (default: a log
    warning), naming the holder's PID, so the user knows why nothing happens.

    Raises:
        HardwareError: the lock cannot be created (the offload dir is not writable).
    """
    path = _lock_path(store_dir)
    try:
        fd = _open_lock(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except HardwareError:
        if not path.parent.is_dir():
            raise
        # a read-only offload dir: a store there can be used, not packed (the pack says so)
        log.info("cannot lock %s (read-only?): reading without the lock", path)
        yield
        return
    except BlockingIOError:
        message = (f"waiting for {_holder(path)}, which is {what} {store_dir.name} in "
                   f"{store_dir.parent} (lock {path.name}); it is reused when done")
        (on_wait or log.warning)(message)
        t0 = time.perf_counter()
        fd = _open_lock(path, fcntl.LOCK_EX)
        log.info("waited %.1f s for %s", time.perf_counter() - t0, path)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        _release(fd, path)


class DiskUsers:
    """The shared lock a process holds while it reads an offload dir's stores (``close``
    releases it, removing the file when it is the last holder)."""

    def __init__(self, offload_dir: Path):
        self._fd: int | None = None
        self._path = Path(offload_dir) / BUSY_FILE
        try:
            self._fd = _open_lock(self._path, fcntl.LOCK_SH)
        except HardwareError as e:   # a read-only offload dir: nobody can be told
            log.info("cannot mark %s as in use: %s", offload_dir, e)

    def close(self) -> None:
        if self._fd is not None:
            _release(self._fd, self._path)
            self._fd = None


def disk_idle(offload_dir: Path) -> bool:
    """Whether no other process holds ``offload_dir``'s shared lock (reads its stores) now.
    ``True`` where there is no lock file, or it cannot be opened: nobody said they read."""
    try:
        fd = os.open(Path(offload_dir) / BUSY_FILE, os.O_RDWR)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
