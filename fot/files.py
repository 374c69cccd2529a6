"""Two things done to files in several places: hashing one, and holding an exclusive lock on one."""

from __future__ import annotations

import fcntl
import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256(path: Path) -> str:
    """The file's sha256, read 4 MB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def locked(path: Path, wait_s: float = 0.0, held: Callable[[Path], Exception] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing). The kernel drops it when its holder dies, so a
    killed process never leaves a stale lock. When another process holds it for over `wait_s`: `held(path)` is
    raised (default a TimeoutError), only then, so an error inside the locked work is never taken for it."""
    with open(path, "a") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise (held or busy)(path) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def busy(path: Path) -> TimeoutError:
    return TimeoutError(f"{path} is held by another process")
