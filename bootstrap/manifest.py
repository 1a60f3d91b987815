"""manifest.json: the contract between publish and pull (each file's path, size, sha256)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import FatalError

MANIFEST = "manifest.json"
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: Optional[str]  # None only for ALLOW_UNVERIFIED pulls (size/ETag trust)
    etag: Optional[str] = None


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    files: tuple[FileEntry, ...]
    raw: bytes

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON, so reformatting a manifest does not make a new version."""
        return hashlib.sha256(canonical(json.loads(self.raw))).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def canonical(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _safe_rel(path: str) -> str:
    if not isinstance(path, str) or "\x00" in path:
        raise FatalError(f"manifest lists an unsafe path {path!r}; republish the model")
    p = Path(path)
    if p.is_absolute() or ".." in p.parts or not p.parts or path.startswith(".voxbox"):
        raise FatalError(f"manifest lists an unsafe path {path!r}; republish the model")
    return p.as_posix()


def _check_files(files: tuple[FileEntry, ...]) -> None:
    """What the puller relies on: some files, sizes that can be real, each path once and never both
    a file and a directory (either would fail half-way through a pull, or switch to an empty model)."""
    if not files:
        raise FatalError("manifest.json lists no files; a pull would serve an empty model. Republish the model")
    paths = set()
    for f in files:
        if f.path == MANIFEST or f.path.endswith(".part"):  # names the puller keeps for itself
            raise FatalError(f"manifest.json lists {f.path}, a name the puller reserves; rename it and republish")
        if f.size < 0:
            raise FatalError(f"manifest.json gives {f.path} a negative size ({f.size}); republish the model")
        if f.path in paths:
            raise FatalError(f"manifest.json lists {f.path} twice; republish the model")
        paths.add(f.path)
    for path in paths:
        parent = Path(path).parent
        while parent.parts:
            if parent.as_posix() in paths:
                raise FatalError(f"manifest.json lists {parent.as_posix()} as a file and as the directory of "
                                 f"{path}; republish the model")
            parent = parent.parent


def _walk(local_dir: Path):
    """Every path under local_dir, following symlinked directories (a Hugging Face snapshot is made
    of links), sorted so the manifest does not depend on the filesystem's order."""
    out, seen = [], set()
    for root, dirs, names in os.walk(local_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree: walk each directory once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out.extend(Path(root) / n for n in names if not n.startswith("."))
    return sorted(out)


def build(local_dir: Path, name: str, version: str) -> Manifest:
    files = []
    for p in _walk(local_dir):
        rel = p.relative_to(local_dir).as_posix()
        if rel == MANIFEST:
            continue
        if not p.exists():  # a dangling link: publishing without it would ship an incomplete model
            raise FatalError(f"{rel} in {local_dir} is a link to a missing file ({os.readlink(p)}); fetch "
                             "the file or remove the link, then publish again")
        if p.is_file():
            files.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
    if not files:
        raise FatalError(f"{local_dir} holds no files to publish")
    doc = {"name": name, "version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "files": files}
    return parse(json.dumps(doc, indent=2, sort_keys=True).encode())


def parse(raw: bytes) -> Manifest:
    try:
        doc = json.loads(raw)
        files = tuple(FileEntry(_safe_rel(f["path"]), int(f["size"]), f.get("sha256"), f.get("etag"))
                      for f in doc["files"])
        _check_files(files)
        return Manifest(str(doc.get("name", "model")), str(doc.get("version", "")), files, raw)
    except FatalError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise FatalError(f"manifest.json is malformed ({e}); republish with `python -m bootstrap publish`") from None
