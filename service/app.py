"""The Flask application factory: settings → engine → scheduler → routes."""
from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from flask import Flask, g, request
from werkzeug.exceptions import ClientDisconnected

from .api import errors, health, models as models_api, tts, ui, usage as usage_api, voices as voices_api, ws
from .api.errors import ApiError
from .engines import Engine
from .metrics import Metrics
from .models import ModelSet, build_models
from .scheduler import Scheduler
from .settings import Settings
from .synthesis import SynthesisService
from .usage import Usage, parse_quotas
from .voices import VoiceError, VoiceStore

log = logging.getLogger("voxbox")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class AppContext:
    settings: Settings
    models: ModelSet
    voices: VoiceStore
    metrics: Metrics
    usage: Usage

    # The default model's parts, for what does not name a model (presets listed, the OpenAPI document).
    @property
    def engine(self) -> Engine:
        return self.models.default.engine

    @property
    def scheduler(self) -> Scheduler:
        return self.models.default.scheduler

    @property
    def synthesis(self) -> SynthesisService:
        return self.models.default.synthesis


def create_app(settings: Optional[Settings] = None, engine: Optional[Engine] = None) -> Flask:
    settings = settings or Settings()
    settings.check()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    _install_request_id_logging()

    metrics = Metrics()
    storage = None
    if settings.voices_uri:
        from .voice_storage import S3VoiceStorage

        storage = S3VoiceStorage(settings.voices_uri, settings.voices_dir)
        log.info("voices: stored in %s, cached in %s", settings.voices_uri, settings.voices_dir)
    store = VoiceStore(settings.voices_dir, settings.voice_max_bytes, settings.voice_min_seconds,
                       settings.voice_max_seconds, storage)
    try:
        leftovers = store.remove_leftovers()
    except VoiceError as e:  # the shared store is down: serve anyway (presets work), clean up next start
        log.warning("voices: could not clean up leftovers: %s", e)
        leftovers = []
    if leftovers:
        log.info("voices: removed %d leftovers of interrupted uploads/deletes: %s", len(leftovers), ", ".join(leftovers))
    lexicon = settings.lexicon  # read by settings.check(): a bad one never gets here
    if len(lexicon):
        log.info("lexicon: %d entries from %s", len(lexicon), settings.lexicon_file)
    usage = Usage(metrics, settings.daily_char_quota, parse_quotas(settings.client_char_quotas)
                  if settings.client_char_quotas.strip() else {}, settings.usage_max_clients)
    models = build_models(settings, metrics, store, engine, lexicon, usage)
    ctx = AppContext(settings, models, store, metrics, usage)

    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = settings.voice_max_bytes + 1024 * 1024  # multipart overhead
    app.extensions["voxbox"] = ctx
    errors.install(app)
    for bp in (health.bp, models_api.bp, tts.bp, voices_api.bp, ui.bp, usage_api.bp):
        app.register_blueprint(bp)
    ws.register(app)
    # JSON bodies: text is capped at MAX_TEXT_CHARS characters (up to 12 bytes each as \\uXXXX pairs);
    # the 1 MiB margin lets a moderately oversized text still get text_too_long, which names the limit.
    _install_request_hooks(app, metrics, json_limit=1024 * 1024 + 12 * settings.max_text_chars,
                           body_timeout_s=settings.body_read_timeout_s, worker_name=settings.worker_name)
    models.start()
    log.info("VoxBox worker: models %s (default %s), queue=%d per model, threads=%d websockets=%d, batch at most "
             "%d per model", ", ".join(models.names()), models.default.name, settings.queue_size,
             settings.gunicorn_threads, settings.ws_connection_limit, settings.batch_capacity)
    return app


def _read_body(timeout_s: float) -> None:
    """Read the request body now, with a deadline between reads, so a client that stalls mid-body
    (slowloris, a dead uplink) gets 408 and its thread back instead of holding it forever; gunicorn
    has no body timeout of its own. The body is cached for the views (werkzeug parses forms from it)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None or request.path == "/v1/stream" or not (request.content_length or request.headers.get(
            "Transfer-Encoding")):
        return
    sock.settimeout(timeout_s)
    try:
        request.get_data(cache=True, parse_form_data=False)
    except (TimeoutError, ConnectionError, ClientDisconnected):  # werkzeug reports a timeout as the latter
        raise ApiError(408, "request_timeout", f"the request body stopped arriving for {timeout_s:g}s "
                       "(BODY_READ_TIMEOUT_S) before it was complete; send the whole body without pauses",
                       headers={"Connection": "close"}) from None
    sock.settimeout(None)  # streamed responses and WebSockets must not time out while idle


def _install_request_hooks(app: Flask, metrics: Metrics, json_limit: int, body_timeout_s: float,
                           worker_name: str) -> None:
    @app.before_request
    def _start():
        rid = request.headers.get("X-Request-ID", "")
        # A client's id is kept only when it is a sane token: it is echoed and written to every log line.
        g.request_id = rid if _REQUEST_ID.fullmatch(rid) else uuid.uuid4().hex
        g.started = time.monotonic()
        if not request.path.startswith("/v1/voices"):
            # Only voice uploads carry files; everything else is a small JSON body.
            request.max_content_length = json_limit
        _read_body(body_timeout_s)

    @app.after_request
    def _finish(resp):
        resp.headers["X-Request-ID"] = g.get("request_id", "")
        resp.headers["X-Served-By"] = worker_name
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
