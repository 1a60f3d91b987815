"""Helpers shared by the routes: parse a JSON body into a schema, detect a client that went away."""
from __future__ import annotations

import dataclasses
import json
import select
import socket
from typing import Callable, TypeVar

from flask import request
from pydantic import BaseModel, ValidationError

from ..engines import SynthesisParams
from .errors import ApiError, describe_validation_error

M = TypeVar("M", bound=BaseModel)
NESTED_TOO_DEEPLY = "the JSON is nested too deeply to parse; send a flat object, e.g. {\"text\": \"hello\"}"


def parse_json(model: type[M]) -> M:
    raw = request.get_data(cache=False)
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON ({json_problem(e)}); send a JSON object") \
            from None
    except RecursionError:
        raise ApiError(400, "invalid_json", NESTED_TOO_DEEPLY) from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object, e.g. {\"text\": \"hello\"}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise ApiError(400, "invalid_request", describe_validation_error(e)) from None


def json_problem(e: ValueError) -> str:
    """What json.loads objected to, in terms of the JSON (not of Python's settings)."""
    if "int_max_str_digits" in str(e):
        return "a number has more than 4300 digits"
    return str(e)


def client_gone_probe() -> Callable[[], bool]:
    """True once the client's connection is closed (gunicorn exposes the socket in the environ)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return lambda: False

    def gone() -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    return gone


def client_id() -> str:
    """The calling client for usage and quotas: the gateway's X-Client-Id (it replaces any the client sent)."""
    from flask import current_app

    return current_app.extensions["voxbox"].usage.client(request.headers.get("X-Client-Id"))


def synthesis_params(req, speed: float = 1.0) -> SynthesisParams:
    """The generation knobs of any synthesis request body (schemas.VoxCPMKnobs)."""
    return SynthesisParams(speed=float(speed), cfg_value=req.cfg_value, inference_timesteps=req.inference_timesteps,
                           seed=req.seed, normalize=req.normalize, max_len=req.max_len,
                           instructions=(req.instructions or "").strip() or None,
                           lang=None if req.lang == "auto" else req.lang,
                           clone_mode=req.clone_mode.value if req.clone_mode else None)


def instructions_ignored(engine, params: SynthesisParams) -> bool:
    """The request gave instructions and this model cannot apply them (the client is told so)."""
    return params.instructions is not None and not engine.info().supports_instructions


def instruction_headers(engine, params: SynthesisParams) -> dict:
    return {"X-Instructions-Ignored": "true"} if instructions_ignored(engine, params) else {}


def captions_json(svc, prep) -> list[dict]:
    """A finished request's captions (timestamps: sentence) as JSON objects {text, start, end}."""
    return [dataclasses.asdict(c) for c in svc.captions(prep)]
