"""Operational endpoints: /healthz (alive), /readyz (model loaded and warm), /info, /metrics, /openapi.json."""
from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from .openapi import build_openapi

bp = Blueprint("health", __name__)


def _ctx():
    return current_app.extensions["voxbox"]


def _bootstrap_status(ctx) -> dict | None:
    path = ctx.settings.status_file
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@bp.get("/healthz")
def healthz():
    sched = _ctx().scheduler
    if sched.phase == "failed":  # alive but useless: let the orchestrator restart us
        return jsonify({"status": "failed", "error": sched.error}), 503
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    ctx = _ctx()
    sched = ctx.scheduler
    # startup: the worker's own steps so far (load_s, warmup_s, batch_alloc_s, batch_warmup_s); the pull's are in
    # bootstrap.timings, so one request shows where a slow start spent its time.
    ready = sched.ready and not sched.draining  # draining: finishing accepted requests before exiting
    body = {"status": "ready" if ready else "draining" if sched.draining else "not_ready", "phase": sched.phase,
            "startup": sched.startup}
    if sched.error:
        body["error"] = sched.error
    boot = _bootstrap_status(ctx)
    if boot is not None:
        body["bootstrap"] = boot
    if ready:
        return jsonify(body)
    resp = jsonify(body)
    resp.status_code = 503
    resp.headers["Retry-After"] = str(ctx.settings.retry_after_s)
    return resp


@bp.get("/info")
def info():
    ctx = _ctx()
    engine = ctx.engine.info()
    s = ctx.settings
    return jsonify({
        "version": __version__,
        "engine": {"name": engine.name, "model": engine.model, "device": engine.device,
                   "sample_rate": engine.sample_rate, "languages": list(engine.languages),
                   "supports_cloning": engine.supports_cloning, **engine.details},
        "phase": ctx.scheduler.phase,
        "startup": ctx.scheduler.startup,
        "limits": {"max_text_chars": s.max_text_chars, "queue_size": s.queue_size,
                   "batch_size": ctx.scheduler.batch_size,
                   "request_timeout_s": s.request_timeout_s, "sample_rates": list(s.sample_rates),
                   "default_sample_rate": s.default_sample_rate, "voice_max_bytes": s.voice_max_bytes,
                   "voice_seconds": [s.voice_min_seconds, s.voice_max_seconds]},
    })


@bp.get("/metrics")
def metrics():
    return Response(generate_latest(_ctx().metrics.registry), content_type=CONTENT_TYPE_LATEST)


@bp.get("/openapi.json")
def openapi():
    app = current_app._get_current_object()
    doc = app.extensions.get("voxbox.openapi")
    if doc is None:  # built on first use: it scans Unicode once for the text pattern
        ctx = _ctx()
        doc = app.extensions["voxbox.openapi"] = build_openapi(__version__, ctx.settings, ctx.engine)
    return jsonify(doc)
