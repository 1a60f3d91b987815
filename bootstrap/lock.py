"""An exclusive lock on the shared volume, so replicas pulling the same version download it once."""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import FatalError


@contextmanager
def volume_lock(path: Path, timeout_s: float, on_wait=None) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited and on_wait:
                    on_wait()
                waited = True
                if time.monotonic() > deadline:
                    raise FatalError(f"another puller has held {path} for over {timeout_s:.0f}s; if none is "
                                     "running, the volume's file locking is broken (use a local or NFSv4 volume)")
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # closing releases the lock, also when the process dies


def shared_lock(path: Path) -> int:
    """A shared lock, held until the returned fd is closed (or the process, or what it execs, exits).

    Blocks only while someone holds it exclusively (a prune deleting that version: seconds).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd
