"""Start writing a file's dirty pages to disk in the background, while the download goes on.

A verified file is fsynced before it is renamed into place (it must survive a power cut). Left to
the kernel, a fast download piles up hundreds of MB of dirty pages and that fsync then waits for
all of them at the end; asking for write-out as the bytes arrive overlaps the disk with the
network, so the final fsync finds little left. Linux's sync_file_range(SYNC_FILE_RANGE_WRITE) does
exactly that and keeps the pages cached (the worker reads the weights right after the pull);
posix_fadvise(DONTNEED) would also start write-out but then drop the cache. Python has no binding
for it, hence ctypes; elsewhere this is a no-op and the final fsync does all the work.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("bootstrap")

_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-out of dirty pages not already under write-out


def _load():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load()


def start_writeback(fd: int) -> bool:
    """Ask the kernel to start writing fd's dirty pages; returns at once. False where unsupported."""
    if _sync_file_range is None:
        return False
    # Offset 0, length 0: the whole file; pages already being written are skipped, so calling this
    # repeatedly costs little. A failure (e.g. a filesystem without support) only loses the overlap.
    return _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0
