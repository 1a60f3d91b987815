"""The worker's one typed settings object, read from the environment (documented in .env.example)."""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


# Request threads kept free of synthesis and WebSockets: /healthz, /readyz, /metrics, /info, voice
# calls and the immediate 503s for requests beyond the queue. Four lets a probe, a scrape and a
# couple of refusals run at the same moment without waiting for each other.
THREAD_RESERVE = 4


class Settings(BaseSettings):
    # Empty means "the default": .env.example leaves some variables empty, and compose passes them on.
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", env_ignore_empty=True)

    # Engine and model
    tts_engine: Literal["voxcpm", "embedded"] = "embedded"
    model_dir: Optional[Path] = None  # VoxCPM checkpoint directory (set by bootstrap after a pull)
    tts_device: str = "auto"  # auto | cpu | cuda | cuda:N
    # The package's torch.compile of its own one-request loop; auto = on for CUDA when TTS_MAX_BATCH=1
    # (the batched step, which serves otherwise, runs as CUDA graphs and needs no compile).
    tts_compile: Literal["auto", "on", "off"] = "auto"
    warmup: bool = True
    # Requests generated together by continuous batching (VoxCPM): a number, or auto = sized from free
    # GPU memory on CUDA and 1 (one request at a time) on CPU; never more than `batch_capacity`.
    tts_max_batch: str = "auto"

    # VoxCPM generation defaults (each can be overridden per request within bounds)
    voxcpm_cfg_value: float = Field(2.0, ge=0.5, le=5.0)
    voxcpm_inference_timesteps: int = Field(10, ge=1, le=100)
    voxcpm_max_len: int = Field(2048, ge=16)
    voxcpm_normalize: bool = False
    voxcpm_retry_badcase: bool = True
    # Benchmarks only: every sentence chunk generates exactly this many tokens, stop head ignored
    # (random-weight checkpoints stop at random). 0 = off, the only sensible production value.
    voxcpm_fixed_tokens: int = Field(0, ge=0, le=4096)
    # The batched step on CUDA runs as CUDA graphs captured before ready (one per batch-size bucket);
    # off = eager kernels (for diagnosis: several times slower per step).
    voxcpm_cuda_graphs: bool = True
    # torch.compile (inductor) of the batched step's parts before their capture: fused kernels, fewer
    # of them per step; costs a compile on the first start (cached on the models volume after).
    voxcpm_compile_step: bool = False

    # Text
    max_text_chars: int = Field(5000, ge=1)
    max_chunk_chars: int = Field(200, ge=20)
    crossfade_ms: float = Field(15.0, ge=0)

    # Scheduling
    # Requests waiting for the inference thread; one more gets 503 at once. Each waits on a request
    # thread, so GUNICORN_THREADS must cover them (see batch_capacity).
    queue_size: int = Field(8, ge=1)
    request_timeout_s: float = Field(300.0, gt=0)
    retry_after_s: int = Field(2, ge=1)

    # Output
    default_sample_rate: int = 44100
    allowed_sample_rates: str = "8000,16000,22050,24000,32000,44100,48000"

    # Voices
    voices_dir: Path = Path("/models/voices")
    # s3://bucket/prefix/: voices shared by every worker (VOICES_DIR is then their local cache); empty:
    # VOICES_DIR itself (one machine, or a volume all workers share).
    voices_uri: str = ""
    voice_max_bytes: int = 10 * 1024 * 1024
    voice_min_seconds: float = 2.0
    voice_max_seconds: float = 30.0

    # Bootstrap hand-off (status file written by `python -m bootstrap`)
    status_file: Optional[Path] = None

    # HTTP server (gunicorn)
    bind: str = "0.0.0.0:8000"
    gunicorn_threads: int = Field(16, ge=2)
    gunicorn_timeout: int = 0  # 0: no worker timeout; long streams are normal, deadlines are per request
    graceful_timeout: int = 30
    # WebSocket keep-alive: the worker pings every N seconds, so idle connections survive proxies'
    # read timeouts (nginx PROXY_READ_TIMEOUT) and a client that stops answering is closed. 0 = off.
    ws_ping_interval_s: float = Field(25.0, ge=0)
    # Open WebSockets each hold a request thread for their whole life; beyond this many, new ones get
    # 503 so health checks and plain requests always find a thread. 0 = auto: GUNICORN_THREADS / 8.
    ws_max_connections: int = Field(0, ge=0)
    # A client that goes silent this long while sending its request body gets 408 and is dropped,
    # so stalled uploads cannot hold every thread (the gateway buffers bodies; a bare worker does not).
    body_read_timeout_s: float = Field(15.0, gt=0)
    log_level: str = "info"

    @field_validator("tts_max_batch")
    @classmethod
    def _batch_is_auto_or_positive(cls, v: str) -> str:
        if v.strip().lower() not in ("", "auto") and (not v.strip().isdigit() or int(v) < 1):
            raise ValueError("TTS_MAX_BATCH must be auto or a positive integer")
        return v

    @field_validator("allowed_sample_rates")
    @classmethod
    def _rates_are_ints(cls, v: str) -> str:
        rates = [int(r) for r in v.split(",") if r.strip()]
        if not rates or any(r < 8000 or r > 192000 for r in rates):
            raise ValueError("ALLOWED_SAMPLE_RATES must be comma-separated rates between 8000 and 192000")
        return v

    @property
    def ws_connection_limit(self) -> int:
        return self.ws_max_connections or max(1, self.gunicorn_threads // 8)

    @property
    def batch_capacity(self) -> int:
        """Requests the inference thread may run at once (the batch) without starving anything.

        Every queued or running request and every open WebSocket holds a request thread, so the
        threads left after the queue, the WebSockets and THREAD_RESERVE (health checks, metrics,
        voices, and the 503s that shed load) are all a batch may use. With that, a request beyond
        queue + batch always finds a thread that answers 503 at once, and /healthz never waits
        behind synthesis in gunicorn's backlog.
        """
        return self.gunicorn_threads - self.queue_size - self.ws_connection_limit - THREAD_RESERVE

    def _thread_budget(self) -> str:
        return (f"GUNICORN_THREADS={self.gunicorn_threads} - QUEUE_SIZE={self.queue_size} - "
                f"WS_MAX_CONNECTIONS={self.ws_connection_limit} - {THREAD_RESERVE} kept for health checks")

    def _threads_for(self, batch: int) -> int:
        """The fewest GUNICORN_THREADS that leave `batch` for synthesis (auto WebSockets grow with them)."""
        threads = self.gunicorn_threads
        while self.model_copy(update={"gunicorn_threads": threads}).batch_capacity < batch:
            threads += 1
        return threads

    @cached_property
    def sample_rates(self) -> tuple[int, ...]:
        return tuple(sorted(int(r) for r in self.allowed_sample_rates.split(",") if r.strip()))

    def check(self) -> None:
        """Cross-field checks that must stop a production worker at start, not at first request."""
        if self.tts_engine == "voxcpm" and self.model_dir is None:
            raise ValueError("TTS_ENGINE=voxcpm needs MODEL_DIR (a VoxCPM-1.5 checkpoint directory); "
                             "set MODEL_URI so bootstrap pulls one, or set TTS_ENGINE=embedded")
        if self.batch_capacity < 1:
            raise ValueError(f"{self._thread_budget()} leaves {self.batch_capacity} threads for synthesis; raise "
                             f"GUNICORN_THREADS to at least {self._threads_for(1)} or lower QUEUE_SIZE / "
                             "WS_MAX_CONNECTIONS")
        batch = self.tts_max_batch.strip().lower()
        if batch not in ("", "auto") and int(batch) > self.batch_capacity:
            raise ValueError(f"TTS_MAX_BATCH={batch} is more than the {self.batch_capacity} requests the threads "
                             f"can run at once ({self._thread_budget()}); raise GUNICORN_THREADS to at least "
                             f"{self._threads_for(int(batch))} or lower TTS_MAX_BATCH")
        if self.voices_uri:
            from bootstrap.errors import FatalError
            from bootstrap.uri import parse_uri

            try:  # the pull's own parser: the same URIs, the same S3_ENDPOINT_URL rule for oss://
                parse_uri(self.voices_uri, os.environ.get("S3_ENDPOINT_URL"), "VOICES_URI")
            except FatalError as e:
                raise ValueError(f"{e} (or leave VOICES_URI empty to keep voices in VOICES_DIR)") from None
        if self.default_sample_rate not in self.sample_rates:
            raise ValueError(f"DEFAULT_SAMPLE_RATE={self.default_sample_rate} is not in ALLOWED_SAMPLE_RATES")


def load_settings() -> Settings:
    """Settings from the environment, checked; a bad value is one readable line per variable
    (SystemExit), not a pydantic traceback at the top of the worker's log."""
    from pydantic import ValidationError

    try:
        settings = Settings()
        settings.check()
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(str(p) for p in err['loc']).upper()}={err.get('input')!r}: {err['msg']}"
                        for err in e.errors())
        raise SystemExit(f"voxbox: invalid setting ({bad}); fix the environment (see .env.example)") from None
    except ValueError as e:
        raise SystemExit(f"voxbox: invalid settings: {e}") from None
    return settings
