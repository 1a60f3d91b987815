"""boto3 client and transfer settings; credentials come from boto3's standard chain, never logged."""
from __future__ import annotations

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from .errors import FatalError
from .settings import BootstrapSettings
from .uri import ObjectPrefix

MB = 1024 * 1024


def make_client(s: BootstrapSettings, quick: bool = False):
    """quick: few attempts and short timeouts, for when there is a fallback (a verified version on the volume)."""
    config = Config(
        s3={"addressing_style": s.s3_addressing_style},
        # "adaptive" backs off on throttling (503 SlowDown) and retries 5xx and connection errors.
        retries={"max_attempts": 3 if quick else s.pull_retries + 5, "mode": "adaptive"},
        connect_timeout=5 if quick else 10, read_timeout=60, max_pool_connections=max(10, s.pull_concurrency * 2),
    )
    return boto3.client("s3", endpoint_url=s.s3_endpoint_url or None, region_name=s.s3_region or None,
                        config=config)


def transfer_config(s: BootstrapSettings) -> TransferConfig:
    return TransferConfig(multipart_threshold=s.pull_multipart_threshold_mb * MB,
                          multipart_chunksize=s.pull_chunk_mb * MB, max_concurrency=s.pull_concurrency,
                          num_download_attempts=s.pull_retries + 5, use_threads=True)


def explain(e: Exception, where: ObjectPrefix) -> FatalError | None:
    """Errors no retry can fix, as one line; None for errors worth retrying."""
    if isinstance(e, NoCredentialsError):
        return FatalError("no S3 credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                          "(or mount an AWS profile / use an instance role)")
    if isinstance(e, EndpointConnectionError):
        return None
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return FatalError(f"bucket '{where.bucket}' does not exist at this endpoint; check MODEL_URI "
                              "and S3_ENDPOINT_URL")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"):
            return FatalError(f"access denied to {where} ({code}); check AWS_ACCESS_KEY_ID/"
                              "AWS_SECRET_ACCESS_KEY and the bucket policy")
    return None
