"""MODEL_URI parsing: s3://bucket/prefix/ (any S3-compatible store), oss:// as an alias."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

from .errors import FatalError


@dataclass(frozen=True)
class ObjectPrefix:
    bucket: str
    prefix: str  # "" or ends with "/"

    def key(self, rel: str) -> str:
        return f"{self.prefix}{rel}"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_uri(uri: str, endpoint: Optional[str], what: str = "MODEL_URI") -> ObjectPrefix:
    """`what` names where the URI came from (a setting or a command-line argument) in errors."""
    parsed = urlparse(uri.strip())
    if parsed.scheme not in ("s3", "oss") or not parsed.netloc:
        raise FatalError(f"{what} {uri!r} is not s3://bucket/prefix/ (or oss://bucket/prefix/)")
    if parsed.query or parsed.fragment:  # urlparse would silently drop them from the key
        raise FatalError(f"{what} {uri!r} has a '?' or '#' part; use a prefix without them")
    if parsed.scheme == "oss" and not endpoint:
        raise FatalError(f"{what} uses oss:// but S3_ENDPOINT_URL is not set; set it to your OSS region "
                         "endpoint, e.g. https://oss-cn-hangzhou.aliyuncs.com")
    prefix = parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return ObjectPrefix(parsed.netloc, prefix)
