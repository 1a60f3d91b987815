"""python -m bootstrap [pull | publish LOCAL_DIR URI | prune | run]: the worker container's entrypoint.

With no command (the image's ENTRYPOINT), it pulls MODEL_URI into MODELS_DIR when set, sizes the
worker for the GPU, and execs gunicorn with MODEL_DIR pointing at the verified version.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from .errors import FatalError
from .settings import BootstrapSettings
from .status import Status

log = logging.getLogger("bootstrap")
GUNICORN = ["gunicorn", "-c", "service/gunicorn.conf.py", "service.app:create_app()"]


def _pull(s: BootstrapSettings, status: Status, hold: bool = False):
    from .puller import pull

    if not s.model_uri:
        raise FatalError("MODEL_URI is not set; set it to s3://bucket/prefix/ of a published model")
    return pull(s, status, hold=hold)


def _pull_models(s: BootstrapSettings, status: Status, raw: str) -> str:
    """MODELS entries with a `uri`: each pulled like MODEL_URI, into its own folder of the models volume
    (MODELS_DIR/models/<name>: its versions, `current` and locks), then handed to the worker as `dir`.
    Returns the MODELS JSON the worker gets; the worker checks everything else in the entries."""
    import json

    from service.models import read_models

    try:
        entries, _ = read_models(raw)
    except ValueError as e:
        raise FatalError(str(e)) from None
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("uri"):
            continue
        name = str(entry.get("name", ""))
        if not name or "/" in name or name.startswith("."):
            raise FatalError(f"MODELS entry with uri {entry['uri']!r} needs a plain \"name\" (no '/')")
        if entry.get("dir"):
            raise FatalError(f"MODELS entry {name!r} has both uri and dir; give one")
        log.info("model %s: pulling %s", name, entry["uri"])
        one = s.model_copy(update={"model_uri": entry.pop("uri"), "models_dir": s.models_dir / "models" / name})
        result = _pull(one, status, hold=True)
        entry["dir"] = str(result.model_dir.resolve())
        os.set_inheritable(result.in_use_fd, True)  # gunicorn keeps this version from being pruned
    return json.dumps(entries)


def _run(s: BootstrapSettings, status: Status) -> None:
    from .compile_cache import compile_cache_env
    from .gpu import decide, detect_gpus

    env = dict(os.environ)
    if env.get("MODELS", "").strip():
        env["MODELS"] = _pull_models(s, status, env["MODELS"])
    if s.model_uri:
        result = _pull(s, status, hold=True)
        # The resolved version dir, not `current`: a later switch must not move files under us.
        env["MODEL_DIR"] = str(result.model_dir.resolve())
        # gunicorn inherits the shared lock, so no other replica prunes this version while we serve it.
        os.set_inheritable(result.in_use_fd, True)
        if s.prune != "local":
            _start_heartbeat(s, result.digest)
    else:
        log.info("MODEL_URI is empty: no pull (TTS_ENGINE=%s, MODEL_DIR=%s)", env.get("TTS_ENGINE", "embedded"),
                 env.get("MODEL_DIR", "-"))
        status.update(phase="ready", model=env.get("MODEL_DIR") or None, error=None)
    gpus = detect_gpus(env)
    env.update(decide(gpus, env))
    env.update(compile_cache_env(s.models_dir, env.get("MODEL_DIR"), gpus, env))
    env["STATUS_FILE"] = str(status.path)
    log.info("handing off to gunicorn")
    os.execvpe(GUNICORN[0], GUNICORN, env)


def _start_heartbeat(s: BootstrapSettings, digest: str) -> None:
    """A companion process that names our version in a heartbeat file for as long as this process (gunicorn,
    after the exec: the same pid) lives, so a shared-grace prune on another pod keeps it."""
    import subprocess

    from .heartbeat import heartbeat_path

    subprocess.Popen([sys.executable, "-m", "bootstrap", "heartbeat", digest, str(os.getpid()),
                      str(heartbeat_path(s.models_dir))], stdin=subprocess.DEVNULL, close_fds=True)


def _prune_by_hand(s: BootstrapSettings, dry_run: bool) -> int:
    from .puller import prune_versions

    link = s.models_dir / "current"
    current = link.resolve() if link.is_symlink() else None
    removed = prune_versions(s, current, by_hand=True, dry_run=dry_run)
    rule = "flock, KEEP_VERSIONS" if s.prune == "local" else f"unused for PRUNE_GRACE_S={s.prune_grace_s:g}s"
    verb = "would remove" if dry_run else "removed"
    print(f"prune ({rule}): {verb} {len(removed)} version(s){': ' + ', '.join(removed) if removed else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    ap = argparse.ArgumentParser(prog="python -m bootstrap", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("run", help="pull (if MODEL_URI is set), then exec gunicorn (the default)")
    sub.add_parser("pull", help="pull MODEL_URI into MODELS_DIR and exit")
    pub = sub.add_parser("publish", help="upload LOCAL_DIR with a manifest to URI")
    pub.add_argument("local_dir", type=Path)
    pub.add_argument("uri")
    pub.add_argument("--name")
    pub.add_argument("--version")
    pub.add_argument("--create-bucket", action="store_true",
                     help="create the bucket first if it does not exist (a fresh MinIO, say)")
    pr = sub.add_parser("prune", help="remove old model versions from MODELS_DIR now: with PRUNE=local as a pull "
                        "does; otherwise those no heartbeat has named for PRUNE_GRACE_S")
    pr.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    hb = sub.add_parser("heartbeat")  # internal: started by `run` with PRUNE=off / shared-grace
    hb.add_argument("version")
    hb.add_argument("parent_pid", type=int)
    hb.add_argument("path", type=Path)
    args = ap.parse_args(argv)

    try:
        s = BootstrapSettings()
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(str(x) for x in err['loc']).upper()}: {err['msg']}" for err in e.errors())
        print(f"bootstrap: fatal: invalid setting ({bad}); fix the environment (see .env.example)", file=sys.stderr)
        return 1
    status = Status(s.status_path)
    try:
        if args.cmd == "publish":
            from .publish import publish

            m = publish(args.local_dir, args.uri, s, args.name, args.version, create_bucket=args.create_bucket)
            print(f"published {m.name} {m.version} (digest {m.digest[:16]}) to {args.uri}")
        elif args.cmd == "heartbeat":
            from .heartbeat import keep_beating

            keep_beating(args.path, args.version, args.parent_pid, s.heartbeat_interval_s)
        elif args.cmd == "prune":
            return _prune_by_hand(s, args.dry_run)
        elif args.cmd == "pull":
            result = _pull(s, status)
            print(result.model_dir)
        else:
            _run(s, status)
    except FatalError as e:
        status.fail(str(e))
        print(f"bootstrap: fatal: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
