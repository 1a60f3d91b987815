"""A real gunicorn worker (service.app:create_app) on a free loopback port, for the tests."""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import requests

from .procs import PYTHON, REPO_ROOT, Served, free_port, running

# A timed fake engine (tests/support/slow_engine.py); with SLOW_CLONING=1 in the env it takes voice uploads.
SLOW_APP = "tests.support.slow_engine:create_app()"


@dataclass
class Worker(Served):
    """A running worker: `url` (base URL, also its str()), `port`, `log` (its output), `env` (what it got),
    `pid` (gunicorn's master process)."""
    env: dict = field(default_factory=dict)
    pid: int = 0

    def worker_pid(self) -> int:
        """The gunicorn worker process (the master's one child), where the app and its threads live."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        return int(children[0])

    def __str__(self) -> str:
        return self.url

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http"):] + "/v1/stream"


def _ready(url: str) -> bool:
    return requests.get(f"{url}/readyz", timeout=2).status_code == 200


@contextmanager
def start_worker(tmp_dir: Path, env_overrides: Optional[dict] = None, timeout: float = 180,
                 wait_ready: bool = True, app: str = "service.app:create_app()", host: str = "127.0.0.1",
                 port: Optional[int] = None) -> Iterator[Worker]:
    """Start gunicorn with the embedded engine unless `env_overrides` says otherwise; yields a Worker.
    `app` is gunicorn's app spec (tests.support.slow_engine:create_app() serves a timed fake engine).
    `host` and `port` place it (replicas of one service share a port on addresses of their own);
    by default a free port on 127.0.0.1.

    The Worker's `url` is the base URL; `log` is the combined stdout/stderr log file.
    """
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {
        "BIND": f"{host}:{port}",
        "TTS_ENGINE": "embedded",
        "VOICES_DIR": str(tmp_dir / "voices"),
        "GUNICORN_THREADS": "16",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        **(env_overrides or {}),
    }
    log = tmp_dir / f"worker-{host}-{port}.log"
    url = f"http://{host}:{port}"
    gunicorn = str(Path(PYTHON).with_name("gunicorn"))
    cmd = [gunicorn, "-c", str(REPO_ROOT / "service" / "gunicorn.conf.py"), app]
    # Without wait_ready, "answers at all" is enough: a worker whose model failed answers 503.
    check = (lambda: _ready(url)) if wait_ready else (lambda: requests.get(f"{url}/healthz", timeout=2) is not None)
    # Stopped like an orchestrator whose grace period outlasts the worker's own drain (GRACEFUL_TIMEOUT),
    # where a test sets one: a SIGKILL first would cut requests the drain was finishing.
    grace = float(env["GRACEFUL_TIMEOUT"]) + 5 if "GRACEFUL_TIMEOUT" in env else 15
    with running(cmd, log, env=env, ready=check, timeout=timeout, what=f"gunicorn worker on {host}:{port}",
                 stop_grace=grace) as proc:
        yield Worker(url=url, port=port, log=log, env=env, pid=proc.pid)


def ws_collect(ws):
    """Read one /v1/stream request's messages: (header or None, [(arrival time, binary chunk)], final message)."""
    header, chunks = None, []
    while True:
        msg = ws.recv()
        if isinstance(msg, bytes):
            chunks.append((time.monotonic(), msg))
            continue
        body = json.loads(msg)
        if body["type"] == "header":
            header = body
        else:
            return header, chunks, body
