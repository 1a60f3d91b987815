"""Bootstrap settings, read from the environment (documented in .env.example)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class BootstrapSettings(BaseSettings):
    # Empty means "the default": .env.example leaves some variables empty, and compose passes them on.
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", env_ignore_empty=True)

    model_uri: str = ""  # s3://bucket/prefix/ or oss://bucket/prefix/; empty: no pull
    s3_endpoint_url: Optional[str] = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    s3_region: Optional[str] = None
    models_dir: Path = Path("/models")
    pull_concurrency: int = Field(32, ge=1, le=128)
    pull_chunk_mb: int = Field(16, ge=5)
    pull_multipart_threshold_mb: int = Field(32, ge=5)
    pull_retries: int = Field(5, ge=1)
    verify: Literal["fast", "full"] = "fast"
    keep_versions: int = Field(2, ge=1)
    # local: prune at each pull beyond KEEP_VERSIONS, skipping versions a process holds a flock on (a
    # per-pod or local volume); off: never prune automatically (`python -m bootstrap prune` by hand);
    # shared-grace: prune only versions no heartbeat has named for PRUNE_GRACE_S (NFS/EFS, where flock
    # is not to be trusted). off and shared-grace write heartbeats (bootstrap/heartbeat.py).
    prune: Literal["off", "local", "shared-grace"] = "local"
    prune_grace_s: float = Field(86400, gt=0)
    heartbeat_interval_s: float = Field(60, gt=0)
    allow_unverified: bool = False
    pull_lock_timeout_s: float = Field(3600, gt=0)
    status_file: Optional[Path] = None
    progress_interval_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _grace_outlasts_heartbeats(self) -> "BootstrapSettings":
        # A live server's version must never look unused between two of its beats.
        if self.prune_grace_s < 3 * self.heartbeat_interval_s:
            raise ValueError(f"PRUNE_GRACE_S={self.prune_grace_s:g} must be at least 3 x HEARTBEAT_INTERVAL_S="
                             f"{self.heartbeat_interval_s:g}, or a running server's version could be pruned")
        return self

    @property
    def status_path(self) -> Path:
        return self.status_file or self.models_dir / ".voxbox" / "status.json"
