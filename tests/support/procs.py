"""Start and stop real server processes on free loopback ports for the tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]


def read_head(sock: socket.socket) -> bytes:
    """Bytes from a socket up to and including the blank line that ends an HTTP head (or until EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    """One HTTP response with a Content-Length: its head, then reads until the whole body is there
    (a single recv may return the head alone)."""
    data = read_head(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def parse_response(data: bytes) -> tuple[int, dict, bytes]:
    """A whole HTTP response's bytes as (status, headers with lower-case names, the first of each, body)."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    return int(lines[0].split()[1]), headers, body


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_port(hosts: list[str]) -> int:
    """A port free on every one of these loopback addresses: the replicas of one service share a port."""
    for _ in range(20):
        port = free_port()
        socks = []
        try:
            for h in hosts:
                s = socket.socket()
                socks.append(s)
                s.bind((h, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no port free on all of {hosts}")


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail(log)}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s\n{tail(log)}")


def tail(log: Path | None, n: int = 60) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@contextmanager
def running(cmd: Sequence[str], log: Path, env: dict | None = None, cwd: Path | None = None,
            ready: Callable[[], bool] | None = None, timeout: float = 60, what: str = "server",
            stop_signal: int = signal.SIGTERM, stop_grace: float = 15) -> Iterator[subprocess.Popen]:
    """Run `cmd` in its own process group; on exit stop the whole group (no strays left behind), with
    SIGKILL after `stop_grace` seconds."""
    full_env = {**os.environ, **(env or {})}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                cwd=str(cwd or REPO_ROOT), start_new_session=True)
    try:
        if ready is not None:
            wait_until(ready, timeout, what, proc, log)
        yield proc
    finally:
        stop_group(proc, stop_signal, stop_grace)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 15) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


PYTHON = sys.executable


@dataclass
class Served:
    """A server a test started: where it listens and where its output goes."""
    url: str
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
