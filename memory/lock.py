"""One writer at a time: two processes writing to one Chroma path silently damage its index.

`WriterLock` is a `training.locks.HeldLock` taken as a context manager, waiting up to `timeout`
seconds; a writer that times out says who holds the lock.
"""

from __future__ import annotations

from pathlib import Path

from training.errors import ModelcrewError
from training.locks import HeldLock, Timeout


class WriterLock(HeldLock):
    def __init__(self, path: Path, timeout: float = 120.0) -> None:
        super().__init__(path, timeout)
        self.timeout = timeout

    def __enter__(self) -> "WriterLock":
        try:
            self.acquire()
        except Timeout:
            raise ModelcrewError(f"memory: another process holds the write lock on {self.path.parent} "
                                 f"({self.describe_holder()}); waited {self.timeout:g} s — let it finish, or stop it") from None
        return self

    def __exit__(self, *exc) -> None:
        self.release()
