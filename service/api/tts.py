"""POST /tts (the seed's JSON contract) and POST /v1/audio/speech (OpenAI-compatible)."""
from __future__ import annotations

import base64
import itertools

from flask import Blueprint, Response, current_app, jsonify, stream_with_context

from ..encode import FORMATS, STREAMABLE, StreamEncoder, encode
from ..engines import SynthesisParams
from .common import client_gone_probe, parse_json
from .errors import ApiError
from .schemas import SpeechRequest, TTSRequest

bp = Blueprint("tts", __name__)


def _service():
    return current_app.extensions["voxbox"].synthesis


def _params(req, speed: float = 1.0) -> SynthesisParams:
    return SynthesisParams(speed=float(speed), cfg_value=req.cfg_value, inference_timesteps=req.inference_timesteps,
                           seed=req.seed, normalize=req.normalize, max_len=req.max_len)


@bp.post("/tts")
def tts():
    req = parse_json(TTSRequest)
    svc = _service()
    rate = svc.check_rate(req.sample_rate)
    sentences = svc.prepare_text(req.text, req.lang)
    prep = svc.submit(sentences, req.style, _params(req), rate, stream=False, endpoint="tts")
    result = svc.collect(prep, client_gone_probe())
    return jsonify({
        "audio_base64": base64.b64encode(encode(result.audio, result.sample_rate, "wav")).decode("ascii"),
        "duration": round(result.audio.size / result.sample_rate, 3),
        "latency": round(result.latency, 3),
        "sample_rate": result.sample_rate,
    })


@bp.post("/v1/audio/speech")
def speech():
    req = parse_json(SpeechRequest)
    svc = _service()
    rate = svc.check_rate(req.sample_rate)
    if req.stream and req.response_format not in STREAMABLE:
        raise ApiError(400, "format_not_streamable", f"response_format '{req.response_format}' cannot be "
                       f"streamed; use one of {', '.join(STREAMABLE)} or stream=false")
    sentences = svc.prepare_text(req.input, req.lang)
    prep = svc.submit(sentences, req.voice, _params(req, req.speed), rate, stream=req.stream, endpoint="speech")
    fmt = FORMATS[req.response_format]
    if req.stream:
        encoder = StreamEncoder(req.response_format, svc.engine.sample_rate, rate)
        headers = {"X-Sample-Rate": str(encoder.rate), "X-Audio-Channels": "1", "Cache-Control": "no-store",
                   "X-Accel-Buffering": "no"}
        if req.response_format == "pcm":
            headers["X-Audio-Format"] = "s16le"
        chunks = svc.stream(prep, encoder, client_gone_probe())
        first = next(chunks)  # errors before the first audio become JSON errors, not a broken 200
        return Response(stream_with_context(itertools.chain([first], chunks)), status=200,
                        content_type=fmt.content_type, headers=headers)
    result = svc.collect(prep, client_gone_probe())
    body = encode(result.audio, result.sample_rate, req.response_format)
    headers = {"X-Sample-Rate": str(result.sample_rate), "X-Audio-Channels": "1",
               "X-Audio-Duration": f"{result.audio.size / result.sample_rate:.3f}",
               "X-Latency": f"{result.latency:.3f}"}
    if req.response_format == "pcm":
        headers["X-Audio-Format"] = "s16le"
    return Response(body, status=200, content_type=fmt.content_type, headers=headers)
