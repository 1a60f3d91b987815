"""A small JSON status file (phase, bytes, error, per-phase timings; warm or not once done) that the
worker's /readyz shows during and after the pull."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional


class Status:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"phase": "starting", "bytes_done": 0, "bytes_total": 0, "error": None,
                           "model": None, "digest": None}

    def update(self, **fields) -> None:
        self.data.update(fields, updated_at=time.time())
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)  # readers never see half a file
        except OSError:
            pass  # status is informational; never fail a pull over it

    def fail(self, message: str, phase: Optional[str] = None) -> None:
        self.update(phase=phase or "failed", error=message)
