"""The worker's one typed settings object, read from the environment (documented in .env.example)."""
from __future__ import annotations

import os
import socket
from functools import cached_property
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


# Request threads kept free of synthesis and WebSockets: /healthz, /readyz, /metrics, /info, voice
# calls and the immediate 503s for requests beyond the queue. Four lets a probe, a scrape and a
# couple of refusals run at the same moment without waiting for each other.
THREAD_RESERVE = 4
# The least a request naming no sample_rate gets (CD quality), whatever the model's own rate.
CD_RATE = 44100


class Settings(BaseSettings):
    # Empty means "the default": .env.example leaves some variables empty, and compose passes them on.
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", env_ignore_empty=True)

    # Engine and model
    tts_engine: Literal["voxcpm", "voxcpm2", "embedded"] = "embedded"
    model_dir: Optional[Path] = None  # VoxCPM checkpoint directory (set by bootstrap after a pull)
    tts_device: str = "auto"  # auto | cpu | cuda | cuda:N
    # The package's torch.compile of its own one-request loop; auto = on for CUDA when TTS_MAX_BATCH=1
    # (the batched step, which serves otherwise, runs as CUDA graphs and needs no compile).
    tts_compile: Literal["auto", "on", "off"] = "auto"
    warmup: bool = True
    # Requests generated together by continuous batching (VoxCPM): a number, or auto = sized from free
    # GPU memory on CUDA and 1 (one request at a time) on CPU; never more than `batch_capacity`.
    tts_max_batch: str = "auto"

    # VoxCPM's own settings (VOXCPM_*) live with its engine: service/engines/voxcpm/settings.py.

    # Several models in one worker: a JSON list of model entries, or the path of a JSON file with one
    # (service/models.py). Empty: one model from TTS_ENGINE / MODEL_DIR, named MODEL_NAME (default: the
    # family's own name, e.g. voxcpm-1.5).
    models: Optional[str] = None
    model_name: Optional[str] = None

    # Text
    max_text_chars: int = Field(5000, ge=1)
    max_chunk_chars: int = Field(200, ge=20)
    crossfade_ms: float = Field(15.0, ge=0)
    # Streamed requests start with a short first chunk (its first sentence or clause) on engines that
    # make a chunk's audio all at once (the embedded one), so the first audio comes early.
    stream_short_first_chunk: bool = True
    # Voice carry: a multi-chunk request keeps one voice, each chunk after the first continuing from the
    # previous chunk's audio and text (its last VOICE_CARRY_MAX_S seconds), on engines that support it
    # (Engine.supports_carry). off: every chunk is generated on its own (the zero-shot voice may change).
    voice_carry: Literal["on", "off"] = "on"
    voice_carry_max_s: float = Field(5.0, ge=1.0, le=30.0)
    # SSML input (service/ssml.py): the longest <break> and the most pause one request may ask for.
    ssml_max_break_s: float = Field(10.0, gt=0)
    ssml_max_total_break_s: float = Field(60.0, gt=0)
    # Pronunciation lexicon (service/lexicon.py): a JSON or TSV file of word -> replacement, applied to
    # every request's text. A malformed file stops the worker at start.
    lexicon_file: Optional[Path] = None

    # Usage per client (service/usage.py): the gateway's X-Client-Id (a key's hash or a user name).
    # Characters one client may send per UTC day (0: no quota), and per-client limits that replace it:
    # JSON, {"key:0123456789abcdef": 100000, "user:alice": 0} (0 there: no quota for that client).
    daily_char_quota: int = Field(0, ge=0)
    client_char_quotas: str = ""
    # Clients counted by name in /metrics; more than this share the label "other" (bounded cardinality).
    usage_max_clients: int = Field(200, ge=1)

    # Scheduling
    # Requests waiting for the inference thread; one more gets 503 at once. Each waits on a request
    # thread, so GUNICORN_THREADS must cover them (see batch_capacity).
    queue_size: int = Field(8, ge=1)
    request_timeout_s: float = Field(300.0, gt=0)
    retry_after_s: int = Field(2, ge=1)

    # Output. DEFAULT_SAMPLE_RATE unset: each model's own rate (VoxCPM2 48000, VoxCPM-1.5 44100), and 44100
    # for engines below it (Piper's 22050 is upsampled); ALLOWED_SAMPLE_RATES plus each model's own rate.
    default_sample_rate: Optional[int] = None
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
    # Sent as X-Served-By on every response, so a client (or a test) behind the gateway can tell which of
    # several workers answered. Default: the host name, which is the container id under Compose and the
    # pod name under Kubernetes, so every replica is told apart with nothing set.
    worker_name: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9._:-]{1,128}$")

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

    @field_validator("client_char_quotas")
    @classmethod
    def _quotas_are_a_json_object(cls, v: str) -> str:
        if v.strip():
            from .usage import parse_quotas

            parse_quotas(v)
        return v

    @property
    def carry_seconds(self) -> float:
        """The continuation prompt's bound for the scheduler; 0 when voice carry is off."""
        return self.voice_carry_max_s if self.voice_carry == "on" else 0.0

    @property
    def ws_connection_limit(self) -> int:
        return self.ws_max_connections or max(1, self.gunicorn_threads // 8)

    @cached_property
    def model_specs(self) -> list:
        """The models to serve (service/models.py): MODELS, or the one TTS_ENGINE / MODEL_DIR names."""
        from .models import ModelSpec, parse_models

        if self.models:
            return parse_models(self.models)
        from .engines.registry import FAMILIES

        family = FAMILIES[self.tts_engine]
        return [ModelSpec(self.model_name or family.default_model_name, engine=family.name,
                          dir=self.model_dir if family.needs_checkpoint else None, default=True)]

    @property
    def batch_capacity(self) -> int:
        """Requests each model's inference thread may run at once (its batch) without starving anything.

        Every queued or running request and every open WebSocket holds a request thread, so the
        threads left after each model's queue, the WebSockets and THREAD_RESERVE (health checks,
        metrics, voices, and the 503s that shed load) are all the batches may use, shared equally
        by the models. With that, a request beyond queue + batch always finds a thread that answers
        503 at once, and /healthz never waits behind synthesis in gunicorn's backlog.
        """
        n = len(self.model_specs)
        return (self.gunicorn_threads - n * self.queue_size - self.ws_connection_limit - THREAD_RESERVE) // n

    def _thread_budget(self) -> str:
        n = len(self.model_specs)
        queues = f"{n} x QUEUE_SIZE={self.queue_size}" if n > 1 else f"QUEUE_SIZE={self.queue_size}"
        per = f", shared by {n} models" if n > 1 else ""
        return (f"GUNICORN_THREADS={self.gunicorn_threads} - {queues} - "
                f"WS_MAX_CONNECTIONS={self.ws_connection_limit} - {THREAD_RESERVE} kept for health checks{per}")

    def _threads_for(self, batch: int) -> int:
        """The fewest GUNICORN_THREADS that leave `batch` for synthesis (auto WebSockets grow with them)."""
        threads = self.gunicorn_threads
        while self.model_copy(update={"gunicorn_threads": threads}).batch_capacity < batch:
            threads += 1
        return threads

    @cached_property
    def lexicon(self):
        """The pronunciation lexicon of LEXICON_FILE (service/lexicon.py), read once; empty when unset."""
        from .lexicon import load

        return load(self.lexicon_file)

    @cached_property
    def sample_rates(self) -> tuple[int, ...]:
        return tuple(sorted(int(r) for r in self.allowed_sample_rates.split(",") if r.strip()))

    def rates_for(self, native: int) -> tuple[int, ...]:
        """Output rates a model whose audio is `native` Hz serves: ALLOWED_SAMPLE_RATES and its own."""
        return tuple(sorted({*self.sample_rates, native}))

    def default_rate_for(self, native: int) -> int:
        """The output rate of a request that names none, for a model whose audio is `native` Hz."""
        return self.default_sample_rate or max(native, CD_RATE)

    def check(self) -> None:
        """Cross-field checks that must stop a production worker at start, not at first request."""
        if self.tts_engine != "embedded" and self.model_dir is None and not self.models:
            raise ValueError(f"TTS_ENGINE={self.tts_engine} needs MODEL_DIR (a checkpoint directory); "
                             "set MODEL_URI so bootstrap pulls one, or set TTS_ENGINE=embedded")
        from .engines.registry import family_for

        for spec in self.model_specs:  # unknown engines, checkpoints of unknown families: refused now
            family_for(spec)
        if self.batch_capacity < 1:
            raise ValueError(f"{self._thread_budget()} leaves {self.batch_capacity} threads for synthesis; raise "
                             f"GUNICORN_THREADS to at least {self._threads_for(1)} or lower QUEUE_SIZE / "
                             "WS_MAX_CONNECTIONS")
        for spec in self.model_specs:
            batch = spec.max_batch(self).strip().lower()
            if batch not in ("", "auto") and int(batch) > self.batch_capacity:
                what = f"max_batch {batch} of model '{spec.name}'" if spec.batch else f"TTS_MAX_BATCH={batch}"
                raise ValueError(f"{what} is more than the {self.batch_capacity} requests the threads "
                                 f"can run at once ({self._thread_budget()}); raise GUNICORN_THREADS to at least "
                                 f"{self._threads_for(int(batch))} or lower it")
        if self.voices_uri:
            from bootstrap.errors import FatalError
            from bootstrap.uri import parse_uri

            try:  # the pull's own parser: the same URIs, the same S3_ENDPOINT_URL rule for oss://
                parse_uri(self.voices_uri, os.environ.get("S3_ENDPOINT_URL"), "VOICES_URI")
            except FatalError as e:
                raise ValueError(f"{e} (or leave VOICES_URI empty to keep voices in VOICES_DIR)") from None
        if self.default_sample_rate is not None and self.default_sample_rate not in self.sample_rates:
            raise ValueError(f"DEFAULT_SAMPLE_RATE={self.default_sample_rate} is not in ALLOWED_SAMPLE_RATES")
        self.lexicon  # read here: a malformed lexicon (LexiconError names its line) stops the start


def load_settings() -> Settings:
    """Settings from the environment, checked; a bad value is one readable line per variable
    (SystemExit), not a pydantic traceback at the top of the worker's log."""
    from pydantic import ValidationError

    try:
        settings = Settings()
        settings.check()
    except ValidationError as e:
        raise SystemExit(f"voxbox: invalid setting ({_described(e)}); fix the environment (see .env.example)") from None
    except ValueError as e:
        raise SystemExit(f"voxbox: invalid settings: {e}") from None
    from .engines.registry import family_for

    for spec in settings.model_specs:  # a family's own settings (VOXCPM_*) are checked at start too
        model = family_for(spec).settings_model
        if model is None:
            continue
        try:
            model(**spec.settings)
        except ValidationError as e:
            bad = _described(e, model.model_config.get("env_prefix", ""))
            raise SystemExit(f"voxbox: invalid setting ({bad}); fix the environment or the MODELS entry "
                             "(see .env.example)") from None
    return settings


def _described(e, prefix: str = "") -> str:
    """A pydantic ValidationError as NAME=value: reason, per variable (NAME with its env prefix)."""
    return "; ".join(f"{prefix.upper()}{'.'.join(str(p) for p in err['loc']).upper()}={err.get('input')!r}: "
                     f"{err['msg']}" for err in e.errors())
