"""Pull a published model version into MODELS_DIR/versions/<digest>/ and point MODELS_DIR/current at it.

Invariants: a file appears at its final path only after its size and sha256 match the manifest
(downloads land as `*.part` and are renamed); `current` is switched with one atomic rename, and only
to a version whose every file was verified; a version is downloaded by one process at a time (a lock
on the volume), so replicas sharing the volume fetch each object once and then reuse it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError
from s3transfer.manager import TransferManager
from s3transfer.subscribers import BaseSubscriber

from . import manifest as mf
from .compile_cache import prune_compile_caches
from .errors import FatalError
from .heartbeat import beat, heartbeat_path, last_beats, remove_stale
from .lock import shared_lock, volume_lock
from .progress import Progress
from .s3client import explain, make_client, transfer_config
from .settings import BootstrapSettings
from .status import Status
from .uri import ObjectPrefix, parse_uri
from .writeback import start_writeback

log = logging.getLogger("bootstrap")

VERIFIED = ".voxbox-verified.json"  # {path: {size, mtime_ns, sha256}}: what was checked, and when
COMPLETE = ".voxbox-complete"


@dataclass
class PullResult:
    model_dir: Path
    digest: str
    downloaded_bytes: int
    warm: bool
    seconds: float
    in_use_fd: int | None = None  # shared lock on the version: pruning skips it while this fd is open

    def release(self) -> None:
        if self.in_use_fd is not None:
            os.close(self.in_use_fd)
            self.in_use_fd = None


def pull(s: BootstrapSettings, status: Status, hold: bool = False) -> PullResult:
    """Pull MODEL_URI's version and switch `current` to it.

    With hold=True the result keeps a shared lock on the version (inherit it across exec to keep it
    for the server's lifetime); otherwise it is released before returning.
    """
    result = _pull(s, status)
    if not hold:
        result.release()
    return result


class _Timings:
    """Seconds per pull phase, published in the status file as each phase ends (so /readyz shows
    where a slow start spends its time while it is still under way, not only afterwards).

    list_s: making the S3 client and reading the manifest; check_s: verifying files already on the
    volume before deciding what to fetch; wait_s: waiting for another replica pulling the same
    version; download_s: transfers (sha256 is mostly computed as the bytes arrive, so it is in here);
    verify_s: hashing what was left, final size/sha256 checks and fsyncs; total_s: the whole pull,
    `current` switch and pruning included.
    """

    PHASES = ("list_s", "check_s", "wait_s", "download_s", "verify_s")

    def __init__(self, status: Status):
        self.status = status
        self.t0 = time.monotonic()
        self.s = dict.fromkeys(self.PHASES, 0.0)

    def add(self, phase: str, seconds: float) -> None:
        self.s[phase] += seconds
        self.status.update(timings=self.rounded())

    def rounded(self, total: bool = False) -> dict:
        out = {k: round(v, 4) for k, v in self.s.items()}
        if total:
            out["total_s"] = round(time.monotonic() - self.t0, 4)
        return out


def _pull(s: BootstrapSettings, status: Status) -> PullResult:
    timings = _Timings(status)
    t0 = timings.t0
    # Wall-clock start, so a reader can place the pull within the whole start-up (bench/cold_start.py).
    started_at = time.time()
    where = parse_uri(s.model_uri, s.s3_endpoint_url)
    _check_models_dir(s.models_dir)
    status.update(phase="listing", error=None, started_at=started_at)
    fallback = _verified_current(s)
    try:
        # With a verified version on the volume a store outage must not hold the start for minutes:
        # a few quick tries, then serve what is there (below). Without one, retry as long as a pull does.
        client = make_client(s, quick=fallback is not None)
        manifest = _fetch_manifest(client, where, s)
    except (BotoCoreError, ValueError, ClientError) as e:  # unreachable or invalid endpoint, no credentials
        fatal = explain(e, where) if isinstance(e, (BotoCoreError, ClientError)) else None
        reason = ' '.join(str(e).split())
        if fatal is None and fallback is not None and not isinstance(e, ValueError):
            return _serve_offline(s, status, where, fallback, reason, timings)
        raise (fatal or FatalError(f"cannot read {where}{mf.MANIFEST}: {reason}; check S3_ENDPOINT_URL, "
                                   "S3_REGION and the network"
                                   + ("" if fallback else " (no verified model on the volume to start from)"))
               ) from None
    digest = manifest.digest[:16]
    vdir = s.models_dir / "versions" / digest
    status.update(model=f"{manifest.name}:{manifest.version}", digest=digest, bytes_total=manifest.total_bytes)
    timings.add("list_s", time.monotonic() - t0)
    log.info("pull: %s -> %s (%s %s, %d files, %.1f MB), listed in %.2fs", where, vdir, manifest.name,
             manifest.version, len(manifest.files), manifest.total_bytes / 1e6, time.monotonic() - t0)

    locks = s.models_dir / ".voxbox" / "locks"
    if s.prune != "local":
        # Before anything looks at the version: a shared-grace prune elsewhere then keeps it (flock may not).
        beat(heartbeat_path(s.models_dir), digest)
    # Taken before anything else looks at the version, so another replica's prune cannot delete it
    # between our check and our use (pruning needs this lock exclusively and never waits for it).
    in_use = shared_lock(locks / f"{digest}.inuse")
    try:
        downloaded = 0
        t_check = time.monotonic()
        warm = _is_verified(vdir, manifest, s.verify)
        timings.add("check_s", time.monotonic() - t_check)
        if warm:
            log.info("pull: all %d files verified earlier (%s check in %.2fs)", len(manifest.files),
                     "sha256" if s.verify == "full" else "size+mtime", time.monotonic() - t_check)
        else:
            waited = []

            def on_wait() -> None:
                waited.append(True)
                log.info("pull: another replica is pulling %s; waiting for it", digest)

            t_wait = time.monotonic()
            with volume_lock(locks / f"{digest}.lock", s.pull_lock_timeout_s, on_wait=on_wait):
                timings.add("wait_s", time.monotonic() - t_wait)
                # It may have finished while we waited; its files were hashed moments ago, so
                # size+mtime suffices even with VERIFY=full.
                t_check = time.monotonic()
                warm = bool(waited) and _is_verified(vdir, manifest, "fast")
                timings.add("check_s", time.monotonic() - t_check)
                if not warm:
                    downloaded = _download_version(client, where, manifest, vdir, s, status, timings)
        with volume_lock(locks / "current.lock", s.pull_lock_timeout_s):
            _switch_current(s.models_dir, vdir)
            prune_versions(s, vdir)
    except BaseException:
        os.close(in_use)
        raise
    took = time.monotonic() - t0
    status.update(phase="ready", bytes_done=manifest.total_bytes, error=None, warm=warm,
                  timings=timings.rounded(total=True))
    log.info("pull: %s ready in %.2fs total (%s)", digest, took,
             "warm start, nothing downloaded" if warm else f"{downloaded / 1e6:.1f} MB downloaded")
    return PullResult(vdir, digest, downloaded, warm, took, in_use)


def _verified_current(s: BootstrapSettings) -> tuple[Path, mf.Manifest] | None:
    """The version `current` points at, if it is complete and every file still checks out against the
    manifest stored with it (size + mtime as recorded when hashed; sha256 too with VERIFY=full)."""
    link = s.models_dir / "current"
    try:
        vdir = link.resolve(strict=True)
        manifest = mf.parse((vdir / mf.MANIFEST).read_bytes())
    except (OSError, FatalError, ValueError):
        return None
    if any(f.sha256 is None for f in manifest.files) and not s.allow_unverified:
        return None  # pulled under ALLOW_UNVERIFIED, which is no longer set: not verified
    return (vdir, manifest) if _is_verified(vdir, manifest, s.verify) else None


def _serve_offline(s: BootstrapSettings, status: Status, where: ObjectPrefix, fallback: tuple[Path, mf.Manifest],
                   reason: str, timings: _Timings) -> PullResult:
    """The store is unreachable: start from the verified `current` version instead of failing.

    Whether it is still MODEL_URI's latest cannot be known; the warning says so in the log and in the
    status file (/readyz shows it), and the next start with the store reachable pulls as usual.
    """
    vdir, manifest = fallback
    digest = vdir.name
    locks = s.models_dir / ".voxbox" / "locks"
    in_use = shared_lock(locks / f"{digest}.inuse")
    if not _is_verified(vdir, manifest, "fast"):  # pruned by another replica before we took the lock
        os.close(in_use)
        raise FatalError(f"cannot read {where}{mf.MANIFEST} ({reason}) and the verified version on the volume "
                         "was removed meanwhile; check S3_ENDPOINT_URL and the network")
    warning = (f"store unreachable ({reason}); starting from the verified version on the volume "
               f"({manifest.name} {manifest.version}, {digest}), which may not be MODEL_URI's latest")
    log.warning("pull: %s", warning)
    took = time.monotonic() - timings.t0
    status.update(phase="ready", model=f"{manifest.name}:{manifest.version}", digest=digest,
                  bytes_total=manifest.total_bytes, bytes_done=manifest.total_bytes, error=None, warm=True,
                  offline=True, warning=warning, timings=timings.rounded(total=True))
    return PullResult(vdir, digest, 0, True, took, in_use)


def _check_models_dir(models_dir: Path) -> None:
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FatalError(f"MODELS_DIR {models_dir} exists but is not a directory; point MODELS_DIR at the "
                         "models volume") from None
    except OSError as e:
        raise FatalError(f"MODELS_DIR {models_dir} cannot be created ({e.strerror}); mount the models volume "
                         "there or fix MODELS_DIR") from None
    if not os.access(models_dir, os.W_OK):
        raise FatalError(f"MODELS_DIR {models_dir} is not writable by this user (uid {os.getuid()}); fix the "
                         "volume's ownership")


# -- manifest -----------------------------------------------------------------------------------
def _fetch_manifest(client, where: ObjectPrefix, s: BootstrapSettings) -> mf.Manifest:
    try:
        raw = client.get_object(Bucket=where.bucket, Key=where.key(mf.MANIFEST))["Body"].read()
        return mf.parse(raw)
    except ClientError as e:
        fatal = explain(e, where)
        if fatal:
            raise fatal from None
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
            raise  # the store is failing, not the request: the caller may start from the volume
        if e.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
            raise FatalError(f"cannot read {where}{mf.MANIFEST}: {e}") from None
    if not s.allow_unverified:
        raise FatalError(f"no {mf.MANIFEST} at {where}: publish the model with `python -m bootstrap publish "
                         f"LOCAL_DIR {where}` (or set ALLOW_UNVERIFIED=true to trust sizes only)")
    return _unverified_manifest(client, where)


def _unverified_manifest(client, where: ObjectPrefix) -> mf.Manifest:
    files = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=where.bucket, Prefix=where.prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(where.prefix):]
                if rel and not rel.endswith("/"):
                    files.append({"path": rel, "size": obj["Size"], "sha256": None, "etag": obj["ETag"].strip('"')})
    except ClientError as e:
        raise (explain(e, where) or FatalError(f"cannot list {where}: {e}")) from None
    if not files:
        raise FatalError(f"nothing to pull at {where}")
    log.warning("pull: no manifest; ALLOW_UNVERIFIED=true, so files are checked by size only")
    return mf.parse(json.dumps({"name": where.prefix.strip("/") or where.bucket, "version": "unverified",
                                "files": sorted(files, key=lambda f: f["path"])}, sort_keys=True).encode())


# -- verification state -------------------------------------------------------------------------
def _load_state(vdir: Path) -> dict:
    try:
        return json.loads((vdir / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}


def _save_state(vdir: Path, state: dict) -> None:
    tmp = vdir / f"{VERIFIED}.tmp"
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, vdir / VERIFIED)


def _still_verified(path: Path, entry: mf.FileEntry, record: dict | None) -> bool:
    """Verified earlier and untouched since: same size and mtime as when it was hashed."""
    try:
        st = path.stat()
    except OSError:
        return False
    return bool(record) and st.st_size == entry.size == record["size"] and st.st_mtime_ns == record["mtime_ns"] \
        and record.get("sha256") == entry.sha256


def _is_verified(vdir: Path, manifest: mf.Manifest, mode: str) -> bool:
    if not (vdir / COMPLETE).exists():
        return False
    state = _load_state(vdir)
    for entry in manifest.files:
        path = vdir / entry.path
        if not _still_verified(path, entry, state.get(entry.path)):
            return False
        if mode == "full" and entry.sha256 and mf.sha256_file(path) != entry.sha256:
            log.warning("pull: %s changed on disk; re-downloading it", entry.path)
            return False
    return True


def _verify(path: Path, entry: mf.FileEntry) -> bool:
    if path.stat().st_size != entry.size:
        return False
    if entry.sha256 is not None:
        return mf.sha256_file(path) == entry.sha256
    # ALLOW_UNVERIFIED: a single-part upload's ETag is the body's MD5, so check it where we can;
    # a multipart ETag ("<md5 of md5s>-N") depends on the uploader's part size, so size is all we have.
    if entry.etag and len(entry.etag) == 32 and "-" not in entry.etag:
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            while chunk := f.read(8 * 1024 * 1024):
                h.update(chunk)
        return h.hexdigest() == entry.etag.lower()
    return True


# -- download -----------------------------------------------------------------------------------
class _Progress(BaseSubscriber):
    def __init__(self, progress: Progress):
        self.progress = progress
        self.counted = 0  # this file's net contribution (s3transfer reports retried bytes as negative)

    def on_progress(self, future, bytes_transferred, **kwargs):
        self.counted += bytes_transferred
        self.progress(bytes_transferred)

    def take_back(self) -> None:
        """The file failed: its bytes no longer count."""
        self.progress.rewind(self.counted)
        self.counted = 0


def _download_version(client, where: ObjectPrefix, manifest: mf.Manifest, vdir: Path, s: BootstrapSettings,
                      status: Status, timings: _Timings) -> int:
    vdir.mkdir(parents=True, exist_ok=True)
    (vdir / COMPLETE).unlink(missing_ok=True)
    for stray in vdir.rglob("*.part.*"):  # s3transfer's temp names for filename targets (older pullers)
        stray.unlink(missing_ok=True)
    state = _load_state(vdir)
    todo: list[mf.FileEntry] = []
    t_verify = time.monotonic()
    for entry in manifest.files:
        final, part = vdir / entry.path, vdir / f"{entry.path}.part"
        if _still_verified(final, entry, state.get(entry.path)) and (s.verify == "fast" or _verify(final, entry)):
            continue
        # A download that finished but was not yet renamed when we were killed: check and keep it.
        if part.exists() and part.stat().st_size == entry.size and _verify(part, entry):
            _promote(part, final, entry, state, vdir)
            continue
        todo.append(entry)
    timings.add("check_s", time.monotonic() - t_verify)
    need = sum(e.size for e in todo)
    _check_disk(s.models_dir, need)
    done_bytes = manifest.total_bytes - need
    log.info("pull: %d of %d files to download (%.1f MB); %d already verified (checked in %.2fs)", len(todo),
             len(manifest.files), need / 1e6, len(manifest.files) - len(todo), time.monotonic() - t_verify)

    progress = Progress(manifest.total_bytes, done_bytes, status, s.progress_interval_s)
    t_dl = time.monotonic()
    verify_s = [0.0]
    try:
        attempt = 0
        while todo:
            attempt += 1
            failed = _download_batch(client, where, todo, vdir, state, s, progress, verify_s)
            todo = [entry for entry, _ in failed]
            if todo:
                if attempt >= s.pull_retries:
                    names = ", ".join(e.path for e in todo)
                    errors = [err for _, err in failed if err]
                    if errors:
                        raise FatalError(f"downloading {names} from {where} failed {attempt} times (last error: "
                                         f"{errors[-1]}); check S3_ENDPOINT_URL and the network, then restart")
                    raise FatalError(f"checksum mismatch after {attempt} attempts for {names}: the objects in "
                                     f"{where} differ from its manifest.json; republish the model")
                delay = min(2 ** attempt, 30)
                log.warning("pull: %d file(s) failed verification or download; retrying in %ds", len(todo), delay)
                time.sleep(delay)
    finally:
        progress.close()
    secs = time.monotonic() - t_dl
    log.info("pull: downloaded %.1f MB in %.2fs (%.1f MB/s); sha256 verified as the bytes arrived, "
             "final checks and fsync %.2fs", need / 1e6, secs, need / 1e6 / max(secs, 1e-6), verify_s[0])
    # The final checks ran inside the transfer loop; count them once, as verification.
    timings.add("download_s", secs - verify_s[0])
    status.update(phase="verifying")
    t_final = time.monotonic()
    # Every file verified: record the version as complete (fsync first, so a crash cannot fake it).
    fd = os.open(vdir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    (vdir / mf.MANIFEST).write_bytes(manifest.raw)
    (vdir / COMPLETE).write_text(manifest.digest)
    timings.add("verify_s", verify_s[0] + time.monotonic() - t_final)
    return need


_WRITEBACK_BYTES = 8 * 1024 * 1024  # start disk write-out after every this many bytes received
_READ_CHUNK = 1024 * 1024


class _HashingSink:
    """The download target: s3transfer writes ranged parts into it at their offsets, in any order,
    and the sha256 follows the contiguous prefix as it grows.

    Bytes that extend the prefix are hashed straight from memory; parts that arrived early are read
    back from the page cache once the gap before them fills. So the digest is ready when the last
    byte lands, with no second pass over the file. (A non-seekable target would be simpler, but
    s3transfer then replays a retried GET's bytes into it a second time.) A retry rewrites bytes
    already hashed with the same bytes: ranged GETs are pinned to one ETag.
    """

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "w+b", buffering=0)
        self._h = hashlib.sha256()
        self._pos = 0
        self._frontier = 0  # bytes [0, frontier) are hashed
        self._ahead: dict[int, int] = {}  # start -> end of parts written beyond the frontier
        self.size = 0  # highest offset written
        self._unflushed = 0  # bytes written since write-out was last started

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else (self._pos + offset if whence == 1 else self.size + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data) -> int:
        start, end = self._pos, self._pos + len(data)
        os.pwrite(self._f.fileno(), data, start)
        self._pos = end
        self.size = max(self.size, end)
        if start <= self._frontier < end:
            self._h.update(memoryview(data)[self._frontier - start:])
            self._frontier = end
            while self._frontier in self._ahead:
                self._hash_from_file(self._ahead.pop(self._frontier))
        elif start > self._frontier:
            self._ahead[start] = max(end, self._ahead.get(start, end))
        self._unflushed += len(data)
        if self._unflushed >= _WRITEBACK_BYTES:
            start_writeback(self._f.fileno())
            self._unflushed = 0
        return len(data)

    def _hash_from_file(self, end: int) -> None:
        while self._frontier < end:
            chunk = os.pread(self._f.fileno(), min(_READ_CHUNK, end - self._frontier), self._frontier)
            if not chunk:
                break
            self._h.update(chunk)
            self._frontier += len(chunk)

    def finish(self) -> str:
        """sha256 of the whole file, flushed to disk (a verified file must survive a power cut)."""
        self._hash_from_file(self.size)  # parts whose start was not a part boundary we saw: read them
        os.fsync(self._f.fileno())
        self._f.close()
        return self._h.hexdigest()

    def close(self) -> None:
        self._f.close()


def _download_batch(client, where, entries, vdir, state, s, progress,
                    verify_s) -> list[tuple[mf.FileEntry, str | None]]:
    """Download entries concurrently with boto3's transfer manager.

    Returns the entries to retry, each with its transfer error (None: it arrived but did not match).
    """
    failed: list[tuple[mf.FileEntry, str | None]] = []
    futures = []
    try:
        with TransferManager(client, transfer_config(s)) as manager:
            for entry in entries:
                part = vdir / f"{entry.path}.part"
                part.parent.mkdir(parents=True, exist_ok=True)
                sink = _HashingSink(part)
                counter = _Progress(progress)
                futures.append((entry, sink, counter, manager.download(where.bucket, where.key(entry.path), sink,
                                                                       subscribers=[counter])))
            for entry, sink, counter, future in futures:
                part = sink.path
                try:
                    future.result()
                except (ClientError, BotoCoreError, OSError, RetriesExceededError, S3DownloadFailedError) as e:
                    sink.close()
                    fatal = explain(e, where) if isinstance(e, (ClientError, BotoCoreError)) else None
                    if fatal:
                        raise fatal from None
                    if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                        raise FatalError(f"{where}{entry.path} is listed in manifest.json but missing from the "
                                         "bucket; republish the model") from None
                    if isinstance(e, OSError) and e.errno == 28:
                        raise FatalError(f"disk full while writing {part}; free space on the models volume") from None
                    cause = getattr(e, "last_exception", None) or e  # RetriesExceededError wraps the real one
                    error = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
                    log.warning("pull: %s failed (%s); will retry", entry.path, error)
                    counter.take_back()
                    part.unlink(missing_ok=True)
                    failed.append((entry, error))
                    continue
                t_verify = time.monotonic()
                digest = sink.finish()
                if entry.sha256 is not None:
                    ok = sink.size == entry.size and digest == entry.sha256
                else:
                    ok = _verify(part, entry)
                verify_s[0] += time.monotonic() - t_verify
                if ok:
                    _promote(part, vdir / entry.path, entry, state, vdir, synced=True)
                else:
                    log.warning("pull: %s does not match the manifest (size %d of %d, or sha256); will retry",
                                entry.path, sink.size, entry.size)
                    counter.take_back()
                    part.unlink(missing_ok=True)
                    failed.append((entry, None))
    finally:
        for _, sink, _, _ in futures:
            sink.close()
    return failed


def _promote(part: Path, final: Path, entry: mf.FileEntry, state: dict, vdir: Path, synced: bool = False) -> None:
    if not synced:
        with open(part, "rb") as f:
            os.fsync(f.fileno())
    os.replace(part, final)
    st = final.stat()
    state[entry.path] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": entry.sha256}
    _save_state(vdir, state)


def _check_disk(models_dir: Path, need: int) -> None:
    free = shutil.disk_usage(models_dir).free
    if need > free:
        raise FatalError(f"disk full: the model needs {need / 1e9:.2f} GB more but {models_dir} has "
                         f"{free / 1e9:.2f} GB free; grow the volume or lower KEEP_VERSIONS")


# -- current pointer and pruning ----------------------------------------------------------------
def _switch_current(models_dir: Path, vdir: Path) -> None:
    link = models_dir / "current"
    for stale in models_dir.glob(".current.*.tmp"):  # left by a puller killed here; we hold current.lock
        stale.unlink(missing_ok=True)
    tmp = models_dir / f".current.{os.getpid()}.tmp"
    os.symlink(os.path.relpath(vdir, models_dir), tmp)
    os.replace(tmp, link)  # atomic: readers see the old version or the new one, never neither
    os.utime(vdir / COMPLETE)  # its mtime is "last made current": pruning keeps the recently used ones


def prune_versions(s: BootstrapSettings, current: Path | None, by_hand: bool = False,
                   dry_run: bool = False) -> list[str]:
    """Prune old versions as PRUNE says; returns the versions removed (or that would be, with dry_run).

    At a pull, PRUNE=off prunes nothing; by hand (`python -m bootstrap prune`) it applies the
    shared-grace rule, the only one safe on a volume whose locks are not trusted.
    """
    locks = s.models_dir / ".voxbox" / "locks"
    if s.prune == "local":
        return _prune(s.models_dir, current, s.keep_versions, locks, dry_run)
    if s.prune == "off" and not by_hand:
        log.info("pull: PRUNE=off: old versions are kept (run `python -m bootstrap prune` to remove unused ones)")
        return []
    return _prune_grace(s.models_dir, current, s.keep_versions, s.prune_grace_s, dry_run)


def _prune_grace(models_dir: Path, current: Path | None, keep: int, grace_s: float, dry_run: bool) -> list[str]:
    now = time.time()
    beats = last_beats(models_dir)
    # Each version's last use: a heartbeat naming it, or being made current (a pull under way: written to).
    used = {d: max(beats.get(d.name, 0.0), _last_used(d)) for d in _old_versions(models_dir, current)}
    removed = []
    for old in sorted(used, key=used.get, reverse=True)[keep - 1:]:
        idle = now - max(used[old], old.stat().st_mtime)
        if idle < grace_s:
            log.info("prune: keeping %s beyond KEEP_VERSIONS=%d: used %.0fs ago (PRUNE_GRACE_S=%.0f)",
                     old.name, keep, idle, grace_s)
            continue
        log.info("prune: %s %s, unused for %.0fs (PRUNE_GRACE_S=%.0f)", "would remove" if dry_run else "removing",
                 old.name, idle, grace_s)
        removed.append(old.name)
        if not dry_run:
            _remove_version(old)
    if not dry_run:
        remove_stale(models_dir, grace_s, now)
        _prune_caches(models_dir)
    return removed


def _prune(models_dir: Path, current: Path | None, keep: int, locks: Path, dry_run: bool = False) -> list[str]:
    # Abandoned partial downloads count too, or failed pulls of other versions would fill the volume.
    removed: list[str] = []
    if not (models_dir / "versions").is_dir():
        return removed
    locks.mkdir(parents=True, exist_ok=True)
    for old in sorted(_old_versions(models_dir, current), key=_last_used, reverse=True)[keep - 1:]:
        # Both locks, without waiting: one is held while a replica pulls that version, the other
        # for as long as a replica serves it (the server inherits it); either way, keep the version.
        fds = [os.open(locks / f"{old.name}{ext}", os.O_RDWR | os.O_CREAT, 0o644) for ext in (".lock", ".inuse")]
        try:
            for fd in fds:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("pull: keeping old version %s beyond KEEP_VERSIONS=%d: a replica is using it", old.name, keep)
            continue
        else:
            log.info("pull: %s old version %s (KEEP_VERSIONS=%d)", "would prune" if dry_run else "pruning",
                     old.name, keep)
            removed.append(old.name)
            if not dry_run:
                _remove_version(old)
        finally:
            for fd in fds:
                os.close(fd)
    if not dry_run:
        _prune_caches(models_dir)
    return removed


def _old_versions(models_dir: Path, current: Path | None) -> list[Path]:
    root = models_dir / "versions"
    return [d for d in root.iterdir() if d.is_dir() and d != current] if root.is_dir() else []


def _remove_version(old: Path) -> None:
    (old / COMPLETE).unlink(missing_ok=True)  # first: a half-removed version is never taken as complete
    shutil.rmtree(old, ignore_errors=True)


def _prune_caches(models_dir: Path) -> None:
    """Compile caches of versions no longer on the volume go too."""
    root = models_dir / "versions"
    prune_compile_caches(models_dir, {d.name for d in root.iterdir() if d.is_dir()} if root.is_dir() else set())


def _last_used(vdir: Path) -> float:
    try:
        return (vdir / COMPLETE).stat().st_mtime
    except OSError:
        return vdir.stat().st_mtime
