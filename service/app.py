"""The Flask application factory: settings → engine → scheduler → routes."""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from flask import Flask, g, request

from .api import errors, health, tts, ui, voices as voices_api, ws
from .engines import Engine, build_engine
from .metrics import Metrics
from .scheduler import Scheduler
from .settings import Settings
from .synthesis import SynthesisService
from .voices import VoiceStore

log = logging.getLogger("voxbox")


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    scheduler: Scheduler
    voices: VoiceStore
    synthesis: SynthesisService
    metrics: Metrics


def create_app(settings: Optional[Settings] = None, engine: Optional[Engine] = None) -> Flask:
    settings = settings or Settings()
    settings.check()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    _install_request_id_logging()

    engine = engine or build_engine(settings)
    metrics = Metrics()
    scheduler = Scheduler(engine, metrics, settings.queue_size, settings.retry_after_s, settings.warmup,
                          settings.tts_max_batch)
    store = VoiceStore(settings.voices_dir, settings.voice_max_bytes, settings.voice_min_seconds,
                       settings.voice_max_seconds)
    ctx = AppContext(settings, engine, scheduler, store, SynthesisService(settings, engine, scheduler, store),
                     metrics)

    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = settings.voice_max_bytes + 1024 * 1024  # multipart overhead
    app.extensions["voxbox"] = ctx
    errors.install(app)
    for bp in (health.bp, tts.bp, voices_api.bp, ui.bp):
        app.register_blueprint(bp)
    ws.register(app)
    _install_request_hooks(app, metrics)
    scheduler.start()
    log.info("VoxBox worker: engine=%s queue=%d", settings.tts_engine, settings.queue_size)
    return app


def _install_request_hooks(app: Flask, metrics: Metrics) -> None:
    @app.before_request
    def _start():
        g.request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
        g.started = time.monotonic()

    @app.after_request
    def _finish(resp):
        resp.headers["X-Request-ID"] = g.get("request_id", "")
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(endpoint, str(resp.status_code)).inc()
        if endpoint not in ("/healthz", "/readyz", "/metrics"):
            log.info("%s %s -> %d in %.3fs", request.method, request.path, resp.status_code,
                     time.monotonic() - g.get("started", time.monotonic()))
        return resp


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            record.request_id = g.get("request_id", "-")
        except RuntimeError:  # outside a request (inference thread, start-up)
            record.request_id = "-"
        return True


def _install_request_id_logging() -> None:
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RequestIdFilter) for f in handler.filters):
            handler.addFilter(_RequestIdFilter())
