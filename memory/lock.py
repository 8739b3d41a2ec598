"""One writer at a time: two processes writing to one Chroma path silently damage its index.

`WriterLock` is an exclusive lock on a file in the workspace (fcntl via `filelock`, released by the
kernel when its holder dies, so a kill -9 never leaves it stuck). The holder writes its pid and
command beside the lock, so a second writer that times out can say who holds it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from training.errors import ModelcrewError


class WriterLock:
    def __init__(self, path: Path, timeout: float = 120.0) -> None:
        self.path, self.timeout = Path(path), timeout
        self.holder = self.path.with_suffix(".holder")
        self._lock = FileLock(str(self.path), timeout=timeout, thread_local=False)  # one instance: re-entrant

    def __enter__(self) -> "WriterLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self._lock
        try:
            lock.acquire()
        except Timeout:
            raise ModelcrewError(f"memory: another process holds the write lock on {self.path.parent} "
                                 f"({self.describe_holder()}); waited {self.timeout:g} s — let it finish, or stop it") from None
        if lock.lock_counter == 1:  # the outermost holder in this process says who it is
            self.holder.write_text(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)[:200],
                                               "since": time.strftime("%Y-%m-%dT%H:%M:%S")}), encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def describe_holder(self) -> str:
        try:
            h = json.loads(self.holder.read_text(encoding="utf-8"))
            return f"pid {h['pid']}, `{h['command']}`, since {h['since']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"
