"""JSON errors: every failure answers {"error": {"code", "message"}} with a status that says whose fault it is."""

from __future__ import annotations

import logging
from typing import Optional

from flask import Flask, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from ..errors import ErrorKind, ServiceError

log = logging.getLogger(__name__)

# The one place a service error's kind becomes an HTTP status (WebSockets send the code instead).
STATUS = {
    ErrorKind.INVALID: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED_MEDIA: 415,
    ErrorKind.QUOTA: 429,
    ErrorKind.OVERLOADED: 503,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.DEADLINE: 504,
    ErrorKind.CLIENT_GONE: 499,
    ErrorKind.FAILED: 500,
}


class ApiError(Exception):
    """A refusal at the HTTP edge itself (handshakes, bodies, routes); the service layer raises ServiceError."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: Optional[int] = None, headers: Optional[dict] = None
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, retry_after: Optional[int] = None):
    resp = jsonify({"error": {"code": code, "message": message}})
    resp.status_code = status
    if retry_after is not None:
        resp.headers["Retry-After"] = str(retry_after)
    return resp


# pydantic names each member of a union in the error location ("speed.float", "speed.int").
_UNION_MEMBERS = {"float", "int", "str", "bool"}


def describe_validation_error(err: ValidationError) -> str:
    by_field: dict[str, list[dict]] = {}
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"] if p not in _UNION_MEMBERS) or "body"
        by_field.setdefault(where, []).append(e)
    parts = []
    for where, errs in by_field.items():
        kinds = {e["type"] for e in errs}
        if "extra_forbidden" in kinds:
            parts.append(f"unknown field '{where}'")
        elif kinds <= {"float_type", "float_parsing"}:
            parts.append(f"{where}: Input should be a number, e.g. 1.0")
        else:
            parts.append(f"{where}: {errs[0]['msg']}")
    return "; ".join(parts)


def install(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        resp = error_response(e.status, e.code, e.message, e.retry_after)
        resp.headers.update(e.headers)
        return resp

    @app.errorhandler(ServiceError)
    def _service_error(e: ServiceError):
        if e.kind is ErrorKind.FAILED:
            log.error("%s: %s", e.code, e.message)
        return error_response(STATUS[e.kind], e.code, e.message, e.retry_after)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        status = e.code or 500
        code = {
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
            415: "unsupported_media_type",
        }.get(status, "http_error")
        message = e.description or e.name
        if isinstance(e, MethodNotAllowed) and e.valid_methods:
            allowed = sorted(set(e.valid_methods) - {"HEAD", "OPTIONS"}) or sorted(e.valid_methods)
            message = f"{request.method} is not allowed on {request.path}; use {' or '.join(allowed)}"
        elif isinstance(e, RequestEntityTooLarge):
            limit = request.max_content_length
            message = (
                f"the request body has {request.content_length or 'more than ' + str(limit)} bytes; "
                f"{request.path} takes at most {limit}"
                + (
                    " (VOICE_MAX_BYTES plus form overhead)"
                    if request.path.startswith("/v1/voices")
                    else " (JSON requests; text is limited by MAX_TEXT_CHARS)"
                )
            )
        resp = error_response(status, code, message)
        for name, value in e.get_headers():  # e.g. a 405's Allow
            if name.lower() != "content-type":
                resp.headers[name] = value
        return resp

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unhandled error")
        return error_response(
            500,
            "internal_error",
            "the worker failed on this request; it is logged with its request id, and the worker keeps serving",
        )
