"""The OpenAPI 3.1 document, generated from the same pydantic models that validate requests."""
from __future__ import annotations

from functools import lru_cache

from .schemas import SpeechRequest, TTSRequest

_REF = "#/components/schemas/{model}"


def _json_body(name: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def _error(desc: str) -> dict:
    return {"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_ERRORS = {"400": _error("Invalid input: the message says what to fix"),
           "413": _error("Text or upload over the limit"),
           "503": _error("Not ready or queue full; see Retry-After"),
           "504": _error("Request deadline exceeded")}


@lru_cache(maxsize=1)
def build_openapi(version: str) -> dict:
    schemas = {
        "TTSRequest": TTSRequest.model_json_schema(ref_template=_REF),
        "SpeechRequest": SpeechRequest.model_json_schema(ref_template=_REF),
        "TTSResponse": {"type": "object", "required": ["audio_base64", "duration", "latency", "sample_rate"],
                        "properties": {"audio_base64": {"type": "string", "description": "WAV file, base64"},
                                       "duration": {"type": "number", "description": "seconds of audio"},
                                       "latency": {"type": "number", "description": "server seconds"},
                                       "sample_rate": {"type": "integer"}}},
        "Voice": {"type": "object", "properties": {k: {"type": t} for k, t in (
            ("id", "string"), ("name", "string"), ("transcript", "string"), ("duration", "number"),
            ("sample_rate", "integer"), ("created_at", "number"))}},
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
    }
    audio = {"description": "Audio in the requested format (chunked transfer when stream=true); with "
                            "stream_format=sse, server-sent events: speech.audio.delta {audio: base64}, then "
                            "speech.audio.done {usage}, or error {error: {code, message}}",
             "content": {**{t: {"schema": {"type": "string", "format": "binary"}} for t in (
                 "audio/wav", "audio/flac", "audio/mpeg", "audio/ogg", "audio/L16")},
                 "text/event-stream": {"schema": {"type": "string"}}}}
    simple = {"200": {"description": "OK"}, "503": _error("Not ready")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "VoxBox TTS", "version": version,
                 "description": "Text-to-speech worker (VoxCPM-1.5 or the embedded engine). "
                                "WebSocket streaming: GET /v1/stream (see README)."},
        "paths": {
            "/tts": {"post": {"summary": "Synthesise text to a base64 WAV", "requestBody": _json_body("TTSRequest"),
                              "responses": {"200": {"description": "Audio", "content": {"application/json": {
                                  "schema": {"$ref": "#/components/schemas/TTSResponse"}}}}, **_ERRORS}}},
            "/v1/audio/speech": {"post": {"summary": "OpenAI-compatible speech", "requestBody":
                                          _json_body("SpeechRequest"), "responses": {"200": audio, **_ERRORS}}},
            "/v1/stream": {"get": {"summary": "WebSocket streaming: JSON request, header, binary audio chunks, "
                                              "done (protocol in the README)",
                                   "responses": {"101": {"description": "Switching Protocols (WebSocket)"},
                                                 "426": _error("Not a WebSocket handshake"),
                                                 "503": _error("Too many WebSockets open; see Retry-After")}}},
            "/v1/voices": {
                "get": {"summary": "Presets and uploaded voices", "responses": {"200": {"description": "Voices"}}},
                "post": {"summary": "Upload a reference clip for cloning", "requestBody": {"required": True, "content": {
                    "multipart/form-data": {"schema": {"type": "object", "required": ["file", "name", "text"],
                                                       "properties": {"file": {"type": "string", "format": "binary"},
                                                                      "name": {"type": "string"},
                                                                      "text": {"type": "string"}}}}}},
                         "responses": {"201": {"description": "Created", "content": {"application/json": {
                             "schema": {"$ref": "#/components/schemas/Voice"}}}}, **_ERRORS,
                             "415": _error("Not decodable audio")}}},
            "/v1/voices/{voice_id}": {
                "parameters": [{"name": "voice_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "get": {"summary": "One uploaded voice", "responses": {"200": {"description": "Voice"},
                                                                      "404": _error("No such voice")}},
                "delete": {"summary": "Delete an uploaded voice", "responses": {"200": {"description": "Deleted"},
                                                                                "404": _error("No such voice")}}},
            "/healthz": {"get": {"summary": "Process alive", "responses": simple}},
            "/readyz": {"get": {"summary": "Model loaded and warmed up (phase, bootstrap pull status, startup timings)",
                                "responses": simple}},
            "/info": {"get": {"summary": "Engine, device, limits and startup timings", "responses": {"200": {"description": "OK"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "OK"}}}},
        },
        "components": {"schemas": schemas},
    }
