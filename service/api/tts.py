"""POST /tts (the seed's JSON contract) and POST /v1/audio/speech (OpenAI-compatible)."""
from __future__ import annotations

import base64
import itertools
import json
import logging
import math
from typing import Callable, Iterator, Optional

from flask import Blueprint, Response, current_app, jsonify, stream_with_context

from ..encode import FORMATS, STREAMABLE, StreamEncoder, codec_rate, encode
from .common import captions_json, client_gone_probe, client_id, instruction_headers, parse_json, synthesis_params
from ..errors import ServiceError
from .errors import ApiError
from .models import model_or_400
from .schemas import SpeechRequest, TTSRequest

bp = Blueprint("tts", __name__)
log = logging.getLogger(__name__)

def _service(model: str | None):
    """The service layer of the model the request names (the default one when it names none)."""
    return model_or_400(current_app.extensions["voxbox"], model).synthesis


@bp.post("/tts")
def tts():
    req = parse_json(TTSRequest)
    svc = _service(req.model)
    params = synthesis_params(req)
    prep = svc.start(req.text, req.lang, req.style, params, req.sample_rate, stream=False, endpoint="tts",
                     input_format=req.input_format, client=client_id())
    result = svc.collect(prep, client_gone_probe())
    body = {
        "audio_base64": base64.b64encode(encode(result.audio, result.sample_rate, "wav")).decode("ascii"),
        "duration": round(result.audio.size / result.sample_rate, 3),
        "latency": round(result.latency, 3),
        "sample_rate": result.sample_rate,
    }
    if req.timestamps:
        body["captions"] = captions_json(svc, prep)
    resp = jsonify(body)
    resp.headers.update(instruction_headers(svc.engine, params))
    return resp


@bp.post("/v1/audio/speech")
def speech():
    req = parse_json(SpeechRequest)
    svc = _service(req.model)
    sse = req.stream_format == "sse"
    if req.timestamps and not sse:
        raise ApiError(400, "timestamps_need_sse", "captions (timestamps) come in the speech.audio.done event of "
                       "stream_format 'sse', or in POST /tts's JSON; add stream_format: sse or leave timestamps out")
    if (req.stream or sse) and req.response_format not in STREAMABLE:
        how = "sent as server-sent events" if sse else "streamed"
        raise ApiError(400, "format_not_streamable", f"response_format '{req.response_format}' cannot be {how}; "
                       f"use one of {', '.join(STREAMABLE)}" + ("" if sse else " or stream=false"))
    stream = req.stream or sse
    params = synthesis_params(req, req.speed)
    prep = svc.start(req.input, req.lang, req.voice, params, req.sample_rate, stream=stream, endpoint="speech",
                     input_format=req.input_format, client=client_id())
    said = instruction_headers(svc.engine, params)
    rate = prep.sample_rate
    fmt = FORMATS[req.response_format]
    if stream:
        encoder = StreamEncoder(req.response_format, svc.engine.sample_rate, rate)
        headers = {"X-Sample-Rate": str(encoder.rate), "X-Audio-Channels": "1", "Cache-Control": "no-store",
                   "X-Accel-Buffering": "no", **said}
        if req.response_format == "pcm":
            headers["X-Audio-Format"] = "s16le"
        chunks = svc.stream(prep, encoder, client_gone_probe())
        first = next(chunks)  # errors before the first audio become JSON errors, not a broken 200
        chunks = itertools.chain([first], chunks)
        if sse:
            token_rate = svc.engine.info().token_rate
            captions = (lambda: captions_json(svc, prep)) if req.timestamps else None
            return Response(stream_with_context(_events(chunks, encoder, prep.characters, token_rate, captions)),
                            status=200, content_type="text/event-stream", headers=headers)
        return Response(stream_with_context(chunks), status=200, content_type=fmt.content_type, headers=headers)
    result = svc.collect(prep, client_gone_probe())
    body = encode(result.audio, result.sample_rate, req.response_format)
    headers = {"X-Sample-Rate": str(codec_rate(fmt, result.sample_rate)), "X-Audio-Channels": "1",
               "X-Audio-Duration": f"{result.audio.size / result.sample_rate:.3f}",
               "X-Latency": f"{result.latency:.3f}", **said}
    if req.response_format == "pcm":
        headers["X-Audio-Format"] = "s16le"
    return Response(body, status=200, content_type=fmt.content_type, headers=headers)


def _events(chunks: Iterator[bytes], encoder: StreamEncoder, input_chars: int, token_rate: float,
            captions: Optional[Callable[[], list[dict]]] = None) -> Iterator[str]:
    """OpenAI's speech SSE: speech.audio.delta events with base64 pieces of one audio stream, then
    speech.audio.done with usage (input in characters, output in the model's audio tokens), and the
    captions when asked (known once the audio is complete).

    A failure after the first event cannot change the status any more, so it becomes an `error`
    event the client can show, instead of a stream that just stops.
    """
    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

    try:
        for data in chunks:
            if data:
                yield event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
    except (ApiError, ServiceError) as e:
        log.warning("speech SSE stopped: %s", e.message)
        yield event({"type": "error", "error": {"code": e.code, "message": e.message}})
        return
    output = math.ceil(encoder.seconds * token_rate)
    done = {"type": "speech.audio.done", "usage": {"input_tokens": input_chars, "output_tokens": output,
                                                    "total_tokens": input_chars + output}}
    if captions is not None:
        done["captions"] = captions()
    yield event(done)
