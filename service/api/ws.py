"""GET /v1/stream: WebSocket streaming. One synthesis at a time per connection, many per connection.

Protocol: the client sends a JSON request; the server answers {"type":"header",...}, then binary
audio chunks as they are generated, then {"type":"done",...}. {"type":"cancel"} stops the current
synthesis ({"type":"cancelled"}). Problems are {"type":"error","code","message"} and the connection
stays open for the next request.
"""
from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from typing import Literal, Optional

from flask import Flask, current_app, g, request
from flask_sock import ConnectionClosed, Sock
from pydantic import Field, StrictFloat, StrictInt, StrictStr, ValidationError
from werkzeug.exceptions import MethodNotAllowed

from ..encode import StreamEncoder
from ..synthesis import shutting_down
from .common import NESTED_TOO_DEEPLY, captions_json, client_id, instructions_ignored, json_problem, synthesis_params
from ..errors import ServiceError
from .errors import ApiError, describe_validation_error
from .models import model_or_400
from .schemas import INPUT_FORMAT_DESCRIPTION, InputFormat, Timestamps, VoxCPMKnobs

log = logging.getLogger(__name__)

# An idle connection looks up this often whether the worker is shutting down: if so it is closed (1001,
# going away) so the client reconnects to another worker, instead of holding the shutdown up until
# GRACEFUL_TIMEOUT and then being cut.
_DRAIN_POLL_S = 0.5


class StreamRequest(VoxCPMKnobs):
    type: Literal["synthesize"] = "synthesize"
    model: Optional[StrictStr] = None
    text: StrictStr
    voice: StrictStr = "default"
    format: Literal["pcm16", "wav"] = "pcm16"
    sample_rate: Optional[StrictInt] = None
    speed: StrictFloat = Field(1.0, ge=0.25, le=4.0)
    timestamps: Timestamps = None  # captions in done
    input_format: InputFormat = Field("auto", description=INPUT_FORMAT_DESCRIPTION)


def _error(ws, code: str, message: str, retry_after: Optional[int] = None) -> None:
    body = {"type": "error", "code": code, "message": message}
    if retry_after is not None:
        body["retry_after"] = retry_after
    ws.send(json.dumps(body))


def _parse(raw) -> dict:
    if isinstance(raw, bytes):
        raise ApiError(400, "invalid_message", "send requests as JSON text messages, not binary")
    try:
        msg = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, "invalid_json", f"the message is not valid JSON ({json_problem(e)})") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", NESTED_TOO_DEEPLY) from None
    if not isinstance(msg, dict):
        raise ApiError(400, "invalid_json", 'the message must be a JSON object, e.g. {"text": "hello"}')
    return msg


class _Connection:
    def __init__(self, ws, ctx):
        self.ws, self.ctx = ws, ctx
        self.client = client_id()  # from the handshake: the gateway names the caller once per connection
        self.cancelled = False

    def serve(self) -> None:
        while True:
            raw = self.ws.receive(timeout=_DRAIN_POLL_S)
            if raw is None:  # nothing within the poll interval
                if self.ctx.models.draining:
                    self.ws.close(1001, "the worker is shutting down; reconnect")
                    return
                continue
            try:
                msg = _parse(raw)
                if msg.get("type") == "cancel":
                    _error(self.ws, "nothing_to_cancel", "no synthesis is running on this connection")
                    continue
                try:
                    req = StreamRequest.model_validate(msg)
                except ValidationError as e:
                    raise ApiError(400, "invalid_request", describe_validation_error(e)) from None
                self.synthesize(req)
            except (ApiError, ServiceError) as e:
                _error(self.ws, e.code, e.message, e.retry_after)
            except ConnectionClosed:
                raise
            except Exception:  # a bug must not cost the client its connection (nor go unlogged)
                log.exception("websocket request failed")
                _error(self.ws, "internal_error", "the worker failed on this request; it is logged, "
                       "and this connection stays usable")

    def cancel_requested(self) -> bool:
        """Non-blocking look at incoming messages while audio is being produced."""
        if self.cancelled:
            return True
        try:
            raw = self.ws.receive(timeout=0)
        except ConnectionClosed:
            self.cancelled = True
            return True
        if raw is None:
            return False
        try:
            msg = _parse(raw)
        except (ApiError, ServiceError) as e:
            _error(self.ws, e.code, e.message)
            return False
        if msg.get("type") == "cancel":
            self.cancelled = True
        else:
            _error(self.ws, "busy", "a synthesis is already running on this connection; wait for 'done' "
                   "or send {\"type\": \"cancel\"}")
        return self.cancelled

    def synthesize(self, req: StreamRequest) -> None:
        svc = model_or_400(self.ctx, req.model).synthesis
        params = synthesis_params(req, req.speed)
        prep = svc.start(req.text, req.lang, req.voice, params, req.sample_rate, stream=True, endpoint="websocket",
                         input_format=req.input_format, client=self.client)
        # Said in the header and in done, like the HTTP endpoints' X-Instructions-Ignored header.
        ignored = {"instructions_ignored": True} if instructions_ignored(svc.engine, params) else {}
        rate = prep.sample_rate
        encoder = StreamEncoder("pcm" if req.format == "pcm16" else "wav", svc.engine.sample_rate, rate)
        self.cancelled = False
        chunks = svc.stream(prep, encoder, self.cancel_requested)
        sent = 0
        try:
            # The header waits for the first audio, so a request that fails before any (nothing to
            # say, deadline, engine error) is answered by an error alone, as over HTTP.
            first = next(chunks, None)
            if not self.cancelled:
                self.ws.send(json.dumps({"type": "header", "sample_rate": encoder.rate, "channels": 1,
                                         "format": req.format, "sample_format": "s16le", **ignored}))
            for data in itertools.chain([first] if first is not None else [], chunks):
                if self.cancel_requested():
                    break
                self.ws.send(data)
                sent += 1
        except (ApiError, ServiceError) as e:
            if e.code != "client_closed_request":
                raise
        finally:
            chunks.close()  # cancels the job if it is still running
        job = prep.job
        if self.cancelled:
            self.ws.send(json.dumps({"type": "cancelled", "chunks": sent}))
            return
        done = time.monotonic()
        self.ws.send(json.dumps({
            "type": "done", "chunks": sent,
            "duration": round(encoder.seconds, 3),  # what was sent, SSML pauses included
            "latency": round(done - prep.received_at, 3),
            "ttfa": round(job.first_audio_at - prep.received_at, 3) if job.first_audio_at else None, **ignored,
            **({"captions": captions_json(svc, prep)} if req.timestamps else {}),
        }))


class _Slots:
    """Counts open WebSockets against WS_MAX_CONNECTIONS: each one holds a request thread for its
    whole life, so without a cap idle sockets could take every thread and /healthz would hang."""

    def __init__(self, limit: int, gauge):
        self.limit, self.gauge = limit, gauge
        self.open = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            self.gauge.set(self.open)
            return True

    def give_back(self) -> None:
        with self._lock:
            self.open -= 1
            self.gauge.set(self.open)


def _check_handshake() -> None:
    """Refuse what is not a WebSocket handshake with a JSON answer that says what is wrong (the
    WebSocket library would answer a bare 400, or fail with a 500 on a missing header)."""
    if "websocket" not in request.headers.get("Upgrade", "").lower():
        raise ApiError(426, "websocket_required", f"{request.path} is a WebSocket endpoint; connect with a "
                       "WebSocket client (Upgrade: websocket), or use POST /v1/audio/speech for HTTP",
                       headers={"Upgrade": "websocket", "Connection": "Upgrade"})
    if not request.headers.get("Sec-WebSocket-Key"):
        raise ApiError(400, "bad_handshake", "the WebSocket handshake has no Sec-WebSocket-Key header; use a "
                       "WebSocket client library")
    if request.headers.get("Sec-WebSocket-Version", "").strip() != "13":
        raise ApiError(426, "bad_handshake", "the WebSocket handshake must carry Sec-WebSocket-Version: 13",
                       headers={"Sec-WebSocket-Version": "13"})


def register(app: Flask) -> None:
    # Requests are small JSON: a client cannot make the worker buffer a huge message (closed with 1009).
    settings = app.extensions["voxbox"].settings
    app.config.setdefault("SOCK_SERVER_OPTIONS", {
        "max_message_size": max(1 << 20, 16 * settings.max_text_chars),
        # A ping not answered by the next one closes the socket: dead clients do not keep a thread.
        "ping_interval": settings.ws_ping_interval_s or None,
    })
    sock = Sock(app)
    slots = _Slots(settings.ws_connection_limit, app.extensions["voxbox"].metrics.websockets)

    @app.before_request
    def _admit_websocket():
        if request.path != "/v1/stream" or isinstance(request.routing_exception, MethodNotAllowed):
            return  # other paths, and other methods than GET here (their 405 says which is allowed)
        _check_handshake()
        if app.extensions["voxbox"].models.draining:  # an open socket would hold the shutdown up
            raise shutting_down("this worker is shutting down and takes no new WebSockets", settings.retry_after_s)
        if not slots.take():
            raise ApiError(503, "too_many_streams", f"this worker already has {slots.limit} WebSockets open "
                           "(WS_MAX_CONNECTIONS); retry shortly or close idle connections",
                           retry_after=settings.retry_after_s)
        g.ws_slot = True

    @app.teardown_request
    def _release_websocket(exc):
        if g.pop("ws_slot", False):
            slots.give_back()

    @sock.route("/v1/stream")
    def stream(ws):
        try:
            _Connection(ws, current_app.extensions["voxbox"]).serve()
        except ConnectionClosed:
            pass
