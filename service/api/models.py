"""GET /v1/models (OpenAI's list format), and the one place a request's `model` becomes a served model."""
from __future__ import annotations

from typing import Optional

from flask import Blueprint, current_app, jsonify

from ..errors import ErrorKind, ServiceError
from ..models import ModelRuntime, UnknownModel

bp = Blueprint("models", __name__)


def model_or_400(ctx, name: Optional[str]) -> ModelRuntime:
    try:
        return ctx.models.get(name)
    except UnknownModel as e:
        raise ServiceError(ErrorKind.INVALID, "unknown_model", str(e)) from None


def describe(rt: ModelRuntime, default: bool) -> dict:
    info = rt.engine.info()
    return {"id": rt.name, "object": "model", "created": int(rt.scheduler.startup.get("started_at", 0)),
            "owned_by": "voxbox", "family": info.name, "default": default, "phase": str(rt.scheduler.phase),
            "sample_rate": info.sample_rate, "languages": list(info.languages),
            "supports_cloning": info.supports_cloning, "supports_instructions": info.supports_instructions}


@bp.get("/v1/models")
def list_models():
    models = current_app.extensions["voxbox"].models
    return jsonify({"object": "list", "data": [describe(rt, rt is models.default) for rt in models]})
