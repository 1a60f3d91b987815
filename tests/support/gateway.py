"""Real nginx, rendered by nginx/render.sh exactly as in the gateway image, on a free loopback port."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .procs import REPO_ROOT, Served, free_port, parse_response, port_open, running

RENDER = REPO_ROOT / "nginx" / "render.sh"


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise RuntimeError("nginx is not installed: run `make test`, which installs Debian's nginx-light")
    return found


@dataclass
class Gateway(Served):
    prefix: Path = Path()
    health_port: int = 0
    env: dict = field(default_factory=dict)

    def reload(self) -> subprocess.CompletedProcess:
        """`render.sh --reload` with the environment it started with, as `docker compose exec` runs it."""
        return subprocess.run(["sh", str(RENDER), "--reload"], check=False, env={**os.environ, **self.env},
                              capture_output=True, text=True, timeout=60)


def render_env(prefix: Path, upstream: str, port: int, extra: dict | None = None,
               health_port: int | None = None) -> dict:
    # The health listener gets a port of its own too: gateways of parallel tests must not collide on 6007.
    health = f"127.0.0.1:{health_port or free_port()}"
    return {
        "NGINX_PREFIX": str(prefix), "NGINX_BIN": nginx_binary(), "UPSTREAM": upstream,
        "GATEWAY_LISTEN": f"127.0.0.1:{port}", "GATEWAY_HEALTH_LISTEN": health, "NGINX_WORKER_PROCESSES": "1",
        "ACCESS_LOG": "/dev/stdout", **(extra or {}),
    }


def render(prefix: Path, upstream: str, port: int, extra: dict | None = None,
           mode: str = "--render-only") -> subprocess.CompletedProcess:
    env = {**os.environ, **render_env(prefix, upstream, port, extra)}
    return subprocess.run(["sh", str(RENDER), mode], check=False, env=env, capture_output=True, text=True, timeout=60)


@contextmanager
def start_gateway(tmp_dir: Path, upstream: str, env: dict | None = None) -> Iterator[Gateway]:
    # nginx's workers run as nobody when started by root, so they must be able to read the prefix. It gets
    # a directory of its own under /tmp: any pytest run on the machine resets /tmp/pytest-of-<user> to
    # 0700, and a prefix below it turned every request that reads the htpasswd into a 500.
    prefix = Path(tempfile.mkdtemp(prefix="voxbox-nginx-"))
    prefix.chmod(0o755)
    port, health_port = free_port(), free_port()
    log = Path(tmp_dir) / f"nginx-{port}.log"
    cmd = ["sh", str(RENDER)]
    full_env = render_env(prefix, upstream, port, env, health_port)
    try:
        with running(cmd, log, env=full_env, ready=lambda: port_open(port), timeout=30, what=f"nginx on :{port}"):
            yield Gateway(url=f"http://127.0.0.1:{port}", port=port, prefix=prefix, log=log, health_port=health_port,
                          env=full_env)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def raw_request(port: int, data: bytes, source: str = "127.0.0.1") -> tuple:
    """Send bytes as they are (no client library normalises the path); (status, headers, body) of the answer."""
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return parse_response(got)


def raw_get(port: int, target: str, *headers: str, method: str = "GET", source: str = "127.0.0.1") -> tuple:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    return raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode(), source)


def wait_ready_through(gw: Gateway, auth) -> None:
    from .procs import wait_until

    wait_until(lambda: requests.get(f"{gw.url}/readyz", auth=auth, timeout=2).status_code == 200, 120,
               "worker ready through the gateway", log=gw.log)
