"""GET /v1/usage: the caller's own usage today, as this worker counted it (service/usage.py)."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from .common import client_id

bp = Blueprint("usage", __name__)


@bp.get("/v1/usage")
def usage():
    return jsonify(current_app.extensions["voxbox"].usage.report(client_id()))
