"""`python -m bootstrap publish LOCAL_DIR s3://bucket/prefix/`: upload a model version with its manifest."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from boto3.s3.transfer import S3Transfer
from botocore.exceptions import ClientError

from . import manifest as mf
from .errors import FatalError
from .s3client import explain, make_client, transfer_config
from .settings import BootstrapSettings
from .uri import parse_uri

log = logging.getLogger("bootstrap")


def publish(local_dir: Path, uri: str, s: BootstrapSettings, name: str | None = None,
            version: str | None = None, create_bucket: bool = False) -> mf.Manifest:
    if not local_dir.is_dir():
        raise FatalError(f"{local_dir} is not a directory")
    where = parse_uri(uri, s.s3_endpoint_url, what="the publish URI")
    t0 = time.monotonic()
    manifest = mf.build(local_dir, name or local_dir.name, version or time.strftime("%Y%m%d-%H%M%S"))
    log.info("publish: %d files, %.1f MB hashed in %.1fs", len(manifest.files), manifest.total_bytes / 1e6,
             time.monotonic() - t0)
    client = make_client(s)
    transfer = S3Transfer(client, transfer_config(s))
    try:
        if create_bucket:
            _ensure_bucket(client, where.bucket)
        for entry in manifest.files:
            transfer.upload_file(str(local_dir / entry.path), where.bucket, where.key(entry.path))
        # The manifest goes last: pullers never see a manifest whose files are not all there.
        client.put_object(Bucket=where.bucket, Key=where.key(mf.MANIFEST), Body=manifest.raw,
                          ContentType="application/json")
    except ClientError as e:
        raise (explain(e, where) or FatalError(f"upload to {where} failed: {e}")) from None
    log.info("publish: %s version %s (digest %s) at %s in %.1fs", manifest.name, manifest.version,
             manifest.digest[:16], where, time.monotonic() - t0)
    return manifest


def _ensure_bucket(client, bucket: str) -> None:
    """For a fresh store (a local MinIO, a new R2 account): create the bucket unless it exists."""
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    client.create_bucket(Bucket=bucket)
    log.info("publish: created bucket %s", bucket)
