"""The web UI (one static page, no build step) at / and the interactive API docs at /docs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from flask import Blueprint, current_app, redirect, send_from_directory

bp = Blueprint("ui", __name__)

# Swagger UI's own files ship inside the flask-swagger-ui wheel, so /docs needs no network. Only its
# files are used, not its blueprint: that one renders an inline <script>, which the gateway's
# Content-Security-Policy (script-src 'self') blocks; static/docs.html loads static/docs.js instead.
_SWAGGER_DIST = Path(importlib.util.find_spec("flask_swagger_ui").origin).parent / "dist"


def _page(name: str):
    resp = send_from_directory(current_app.static_folder, name)
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@bp.get("/")
def index():
    return _page("index.html")


@bp.get("/docs")
def docs():
    return _page("docs.html")


@bp.get("/docs/")
def docs_slash():
    # Relative, so it lands on the same page under a path prefix and through the gateway.
    return redirect("../docs", code=308)


@bp.get("/docs/<path:name>")
def docs_asset(name: str):
    return send_from_directory(_SWAGGER_DIST, name, max_age=86400)
