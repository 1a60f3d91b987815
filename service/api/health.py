"""Operational endpoints: /healthz (alive), /readyz (model loaded and warm), /info, /metrics, /openapi.json."""
from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..scheduler import Phase
from .models import describe
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
    failed = [rt for rt in _ctx().models if rt.scheduler.phase == Phase.FAILED]
    if failed:  # alive but (partly) useless: let the orchestrator restart us
        return jsonify({"status": "failed", "error": "; ".join(f"model {rt.name}: {rt.scheduler.error}"
                                                              for rt in failed)}), 503
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    ctx = _ctx()
    sched, models = ctx.scheduler, ctx.models
    # startup: the default model's steps so far (load_s, warmup_s, batch_alloc_s, batch_warmup_s), and every
    # model's under `models`; the pull's are in bootstrap.timings, so one request shows where a slow start
    # spent its time. Ready means every model is ready: a worker is not half-deployed.
    draining = models.draining  # draining: finishing accepted requests before exiting
    ready = all(rt.scheduler.ready for rt in models) and not draining
    body = {"status": "ready" if ready else "draining" if draining else "not_ready", "phase": sched.phase,
            "startup": sched.startup,
            "models": {rt.name: {"phase": rt.scheduler.phase, "startup": rt.scheduler.startup,
                                 **({"error": rt.scheduler.error} if rt.scheduler.error else {})} for rt in models}}
    errors = [f"model {rt.name}: {rt.scheduler.error}" if len(models) > 1 else rt.scheduler.error
              for rt in models if rt.scheduler.error]
    if errors:
        body["error"] = "; ".join(errors)
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
    s = ctx.settings
    return jsonify({
        "version": __version__,
        "engine": _engine(ctx.models.default),  # the default model's, as before several models
        "models": [{**describe(rt, rt is ctx.models.default), "engine": _engine(rt),
                    "batch_size": rt.scheduler.batch_size, "startup": rt.scheduler.startup} for rt in ctx.models],
        "phase": ctx.scheduler.phase,
        "startup": ctx.scheduler.startup,
        "limits": {"max_text_chars": s.max_text_chars, "queue_size": s.queue_size,
                   "batch_size": ctx.scheduler.batch_size,
                   "request_timeout_s": s.request_timeout_s,
                   "sample_rates": list(ctx.models.default.synthesis.sample_rates()),  # each model's: "models"
                   "default_sample_rate": ctx.models.default.synthesis.default_sample_rate(),
                   "voice_max_bytes": s.voice_max_bytes,
                   "voice_seconds": [s.voice_min_seconds, s.voice_max_seconds]},
    })


def _engine(rt) -> dict:
    engine = rt.engine.info()
    return {"name": engine.name, "model": engine.model, "device": engine.device, "sample_rate": engine.sample_rate,
            "languages": list(engine.languages), "supports_cloning": engine.supports_cloning,
            "token_rate": engine.token_rate, **engine.details}


@bp.get("/metrics")
def metrics():
    return Response(generate_latest(_ctx().metrics.registry), content_type=CONTENT_TYPE_LATEST)


@bp.get("/openapi.json")
def openapi():
    app = current_app._get_current_object()
    doc = app.extensions.get("voxbox.openapi")
    if doc is None:  # built on first use: it scans Unicode once for the text pattern
        ctx = _ctx()
        doc = app.extensions["voxbox.openapi"] = build_openapi(
            __version__, ctx.settings, ctx.engine,
            [ctx.models.default.name, *(n for n in ctx.models.names() if n != ctx.models.default.name)])
    return jsonify(doc)
