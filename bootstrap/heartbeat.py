"""Which model versions are in use on a shared volume, without flock.

On NFS/EFS a lock may not be honoured across machines (or may outlive a machine that vanished), so
PRUNE=shared-grace and PRUNE=off record use as files instead: every process that pulls or serves a
version keeps a heartbeat file `MODELS_DIR/.voxbox/heartbeats/<pod>.<pid>.json` naming it, rewritten
every HEARTBEAT_INTERVAL_S by a small companion process that lives as long as the server does. A
version is prunable only when no heartbeat has named it for PRUNE_GRACE_S (hours by default, so clock
differences between machines do not matter).
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from pathlib import Path

log = logging.getLogger("bootstrap")


def heartbeat_dir(models_dir: Path) -> Path:
    return models_dir / ".voxbox" / "heartbeats"


def heartbeat_path(models_dir: Path, pid: int | None = None) -> Path:
    # The pod name (the chart sets POD_NAME) or the host name: pids alone repeat across containers.
    who = os.environ.get("POD_NAME") or socket.gethostname() or "host"
    who = re.sub(r"[^A-Za-z0-9._-]", "_", who)[:100]
    return heartbeat_dir(models_dir) / f"{who}.{pid or os.getpid()}.json"


def beat(path: Path, version: str) -> None:
    """Record "version is in use now", atomically: a reader sees the previous beat or this one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": version, "at": time.time(), "pid": os.getpid()}))
    os.replace(tmp, path)


def last_beats(models_dir: Path) -> dict[str, float]:
    """Per version, the newest heartbeat naming it (seconds since the epoch)."""
    newest: dict[str, float] = {}
    d = heartbeat_dir(models_dir)
    if not d.is_dir():
        return newest
    for f in d.glob("*.json"):
        try:
            data = json.loads(f.read_text())
            version, at = str(data["version"]), float(data["at"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # vanished or half-written by a dead process: says nothing about use
        newest[version] = max(at, newest.get(version, 0.0))
    return newest


def remove_stale(models_dir: Path, grace_s: float, now: float | None = None) -> int:
    """Delete heartbeats older than the grace period (pods that died without cleaning up)."""
    now = time.time() if now is None else now
    removed = 0
    for f in heartbeat_dir(models_dir).glob("*.json") if heartbeat_dir(models_dir).is_dir() else []:
        try:
            at = float(json.loads(f.read_text())["at"])
        except (OSError, ValueError, KeyError, TypeError):
            try:
                at = f.stat().st_mtime
            except OSError:
                continue
        if now - at > grace_s:
            f.unlink(missing_ok=True)
            removed += 1
    return removed


def keep_beating(path: Path, version: str, parent_pid: int, interval_s: float) -> None:
    """The companion process: beat until the parent (the server, after bootstrap's exec) is gone, then
    remove the heartbeat so the version's last use is the last beat of a live server."""
    while True:
        if os.getppid() != parent_pid:
            path.unlink(missing_ok=True)
            return
        try:
            beat(path, version)
        except OSError as e:  # a volume hiccup: try again next time rather than dying
            log.warning("heartbeat: cannot write %s: %s", path, e)
        deadline = time.monotonic() + interval_s
        while time.monotonic() < deadline:
            if os.getppid() != parent_pid:
                break
            time.sleep(min(0.5, interval_s))
