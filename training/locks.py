"""Exclusive locks that say who holds them.

`HeldLock` is an exclusive lock on a file (fcntl via `filelock`, released by the kernel when its holder
dies, so a kill -9 never leaves it stuck). Its holder writes its pid, command and start beside the lock
(`<name>.holder`), so whoever is refused can say who holds it. Memory's and the registry's writer lock
and the retraining loop's one-loop-per-workspace lock are both this.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["HeldLock", "Timeout"]


class HeldLock:
    def __init__(self, path: Path, timeout: float = -1) -> None:
        self.path = Path(path)
        self.holder = self.path.with_suffix(".holder")
        self._lock = FileLock(str(self.path), timeout=timeout, thread_local=False)  # one instance: re-entrant

    def acquire(self, timeout: float | None = None, **about: str) -> None:
        """Take the lock (raises `Timeout`); the outermost holder in this process writes who it is."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire(timeout=timeout)
        if self._lock.lock_counter == 1:
            self.holder.write_text(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)[:300],
                                               "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                               **about}), encoding="utf-8")

    def release(self) -> None:
        self._lock.release()

    def describe_holder(self) -> str:
        try:
            h = json.loads(self.holder.read_text(encoding="utf-8"))
            return ", ".join([f"pid {h['pid']}", f"`{h['command']}`", f"since {h['since']}"] +
                             [f"{k} {v!r}" for k, v in h.items() if k not in ("pid", "command", "since")])
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def held_elsewhere(self) -> str | None:
        """Who holds the lock, when another process does; None when it is free (probed without waiting)."""
        if not self.path.exists():
            return None
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return self.describe_holder()
        self._lock.release()
        return None
