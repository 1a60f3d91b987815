"""Download progress: a bar on a terminal, a log line every few seconds otherwise, and the status file."""
from __future__ import annotations

import logging
import sys
import threading
import time

from .status import Status

log = logging.getLogger("bootstrap")


class Progress:
    def __init__(self, total: int, done: int, status: Status, interval_s: float):
        self.total, self.done, self.status, self.interval = total, done, status, interval_s
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._last = 0.0
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                             desc="pull", file=sys.stderr)

    def __call__(self, n: int) -> None:  # boto3's Callback signature
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            now = time.monotonic()
            if now - self._last >= min(self.interval, 1.0):
                self.status.update(phase="downloading", bytes_done=self.done, bytes_total=self.total)
            if self._bar is None and now - self._last >= self.interval:
                rate = self.done / max(now - self._t0, 1e-6) / 1e6
                log.info("pull: %.1f / %.1f MB (%.0f%%) at %.1f MB/s", self.done / 1e6, self.total / 1e6,
                         100 * self.done / max(self.total, 1), rate)
            if now - self._last >= min(self.interval, 1.0):
                self._last = now

    def rewind(self, n: int) -> None:
        """A failed file's bytes no longer count."""
        with self._lock:
            self.done -= n
            if self._bar is not None:
                self._bar.update(-n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
