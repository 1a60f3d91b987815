"""Bootstrap settings, read from the environment (documented in .env.example)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field
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
    allow_unverified: bool = False
    pull_lock_timeout_s: float = Field(3600, gt=0)
    status_file: Optional[Path] = None
    progress_interval_s: float = Field(5.0, gt=0)

    @property
    def status_path(self) -> Path:
        return self.status_file or self.models_dir / ".voxbox" / "status.json"
