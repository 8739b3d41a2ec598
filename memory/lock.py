"""One writer at a time, and no reader beside it: the embedded Chroma store is not safe otherwise.

Two processes writing to one Chroma path silently damage its index; a process that reads while
another writes can find an id in the sqlite metadata that its HNSW segment does not hold yet
(`InternalError: Error finding id`). So a writer takes `WriterLock` (exclusive) and a reader
`ReaderLock` (shared) on the same file, `memory/write.lock`: readers run together, a writer waits
for them and they wait for it. Both are `flock` locks (the writer's is `training.locks.HeldLock`,
flock through `filelock`), released by the kernel when their holder dies. A lock that times out
says who holds the write lock. Only the embedded store needs them: a Chroma server serialises
its clients itself.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from training.errors import ModelcrewError
from training.locks import HeldLock, Timeout


class WriterLock(HeldLock):
    def __init__(self, path: Path, timeout: float = 120.0) -> None:
        super().__init__(path, timeout)
        self.timeout = timeout

    @property
    def held_here(self) -> bool:
        """Whether this instance holds the lock now (its reads then need no reader lock)."""
        return self._lock.is_locked

    def __enter__(self) -> "WriterLock":
        try:
            self.acquire()
        except Timeout:
            raise ModelcrewError(f"memory: another process holds the write lock on {self.path.parent} "
                                 f"({self.describe_holder()}); waited {self.timeout:g} s — let it finish, or stop it") from None
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ReaderLock:
    """A shared flock on the writer's lock file, re-entrant within one instance.

    Not for a thread that holds the `WriterLock` of the same file: flock locks belong to open files,
    so it would wait for itself (`MemoryStore` skips the reader lock while it writes)."""

    POLL = 0.05  # seconds between tries while a writer holds the lock

    def __init__(self, writer: WriterLock) -> None:
        self.writer = writer
        self._fd: int | None = None
        self._depth = 0

    def __enter__(self) -> "ReaderLock":
        if self._depth == 0:
            self._fd = self._acquire()
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _acquire(self) -> int:
        path = self.writer.path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.writer.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise ModelcrewError(f"memory: another process holds the write lock on {path.parent} "
                                         f"({self.writer.describe_holder()}); a read waited {self.writer.timeout:g} s "
                                         "— let it finish, or stop it") from None
                time.sleep(self.POLL)
            except BaseException:
                os.close(fd)
                raise
