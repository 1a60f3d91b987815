"""The OpenAPI 3.1 document, generated from the pydantic models that validate requests (schemas.py) and
made exact for this worker: its text limit, sample rates, languages and voices, and the rules the
service checks beyond types (a speakable character, no control characters, which formats stream).

What is accepted and what is documented come from the same definitions (the models, service/text.py's
character rules, the settings), and tests/test_openapi_fuzz.py fuzzes a real worker against it.
"""
from __future__ import annotations

import sys
from functools import lru_cache

from .. import ssml, text as textmod
from ..encode import FORMATS, STREAMABLE
from ..models import OPENAI_MODEL_NAMES
from ..synthesis import OPENAI_VOICES
from ..voices import VOICE_ID_PATTERN
from .schemas import (Error, Health, Readiness, SpeechAudioDelta, SpeechAudioDone, SpeechError, SpeechRequest,
                      TTSRequest, TTSResponse, Usage, Voice, VoiceDeleted, VoiceList)

_REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict:
    return {"$ref": _REF.format(model=name)}


@lru_cache(maxsize=8)
def _char_class(kind: str, refuse_cjk: bool, languages: tuple[str, ...]) -> str:
    """A JSON-Schema (ECMA-262) character class body, as ranges, of the characters text may not contain
    (kind "refused") or of those that make it speakable ("speakable"); Chinese characters move from the
    second to the first when lang=auto would refuse them. One pass over Unicode (about a second), once
    per process, on the first /openapi.json."""
    def cjk(ch: str) -> bool:
        return refuse_cjk and any(lo <= ch <= hi for lo, hi in textmod.CJK_RANGES)

    if kind == "refused":
        def predicate(ch: str) -> bool:
            return textmod.refused_char(ch) or cjk(ch)
    else:
        def predicate(ch: str) -> bool:
            return textmod.speakable_char(ch, languages) and not cjk(ch)
    ranges, start = [], None
    for cp in range(sys.maxunicode + 2):
        # Lone surrogates are not Unicode text (the service refuses them too), and ECMA-262 regexes in
        # Unicode mode refuse them in a class: left out.
        ch = chr(cp) if cp <= sys.maxunicode and not 0xD800 <= cp <= 0xDFFF else None
        hit = ch is not None and predicate(ch)
        if hit and start is None:
            start = cp
        elif not hit and start is not None:
            ranges.append((start, cp - 1))
            start = None
    return "".join(_esc(a) if a == b else f"{_esc(a)}-{_esc(b)}" for a, b in ranges)


def _esc(cp: int) -> str:
    # \\uXXXX reads the same in ECMA-262 and Python regexes; beyond the BMP they differ (\\u{...} vs
    # \\U...), so those code points stand as themselves (none of them is special in a class).
    return chr(cp) if cp > 0xFFFF else f"\\u{cp:04x}"


def _text_schema(settings, languages: tuple[str, ...], description: str, refuse_cjk: bool) -> dict:
    """Text the service takes: 1..MAX_TEXT_CHARS characters, none refused, at least one it can speak."""
    # Two patterns (JSON Schema's are searches): no refused character anywhere, and a speakable one somewhere.
    return {"type": "string", "minLength": 1, "maxLength": settings.max_text_chars, "description": description,
            "allOf": [{"pattern": f"^[^{_char_class('refused', refuse_cjk, languages)}]*$"},
                      {"pattern": f"[{_char_class('speakable', refuse_cjk, languages)}]"}]}


def _voice_schema(presets: list[str], description: str) -> dict:
    names = sorted({"", "default", *presets, *OPENAI_VOICES})
    return {"description": description, "default": "default",
            "anyOf": [{"type": "string", "enum": names}, {"type": "string", "pattern": VOICE_ID_PATTERN}]}


def _request_schema(model, settings, languages: tuple[str, ...], rates: tuple[int, ...], presets: list[str],
                    text_field: str, voice_field: str) -> dict:
    schema = model.model_json_schema(ref_template=_REF)
    props = schema["properties"]
    desc = props[text_field].get("description", "")
    props[text_field] = _text_schema(settings, languages, desc, refuse_cjk=False)
    props[voice_field] = _voice_schema(presets, props[voice_field].get("description", ""))
    props["lang"]["enum"] = ["auto", *languages]
    props["sample_rate"]["anyOf"] = [{"type": "integer", "enum": list(rates)}, {"type": "null"}]
    # clone_mode says how an uploaded voice is cloned: with a preset it is refused (clone_mode_without_voice).
    rules = [{"anyOf": [{"not": {"required": ["clone_mode"]}}, {"properties": {"clone_mode": {"const": None}}},
                        {"required": [voice_field], "properties": {voice_field: {"pattern": VOICE_ID_PATTERN}}}]}]
    if "zh" not in languages:  # lang=auto reads Chinese characters as Chinese, which this engine refuses
        rules.append({"anyOf": [
            {"required": ["lang"], "properties": {"lang": {"const": "en"}}},
            {"properties": {text_field: _text_schema(settings, languages, desc, refuse_cjk=True)}}]})
    rules.append(_ssml_rule(text_field, props[text_field].pop("allOf")))
    if model is SpeechRequest:  # mp3 and flac cannot be streamed, as audio or as SSE (mp3 is the default)
        rules.append({"anyOf": [
            {"properties": {"stream": {"const": False}, "stream_format": {"const": "audio"}}},
            {"required": ["response_format"], "properties": {"response_format": {"enum": list(STREAMABLE)}}}]})
        rules.append({"anyOf": [  # captions come in the SSE done event only (an audio body has no room)
            {"properties": {"timestamps": {"type": "null"}}},
            {"required": ["stream_format"], "properties": {"stream_format": {"const": "sse"}}}]})
    schema["allOf"] = rules
    return schema


def _ssml_rule(text_field: str, text_patterns: list) -> dict:
    """SSML input (service/ssml.py) as far as patterns can state it: input_format text is never SSML, auto is
    SSML when the text starts with <speak>, and SSML is a <speak> document. For SSML the pattern states a
    plain form only, <speak> around printable ASCII with a letter or digit (markup inside, and other
    scripts, are accepted but not stated), and text that starts with <speak> is left out of input_format
    text: a fuzzer generating from this rule beside the others was too slow with Unicode-wide classes and
    three branches."""
    plain = "[ -%'-;=?-~]*"  # printable ASCII but & < >
    document = f"^{ssml.SSML_SPACE}<speak>{plain}[A-Za-z0-9]{plain}</speak>{ssml.SSML_SPACE}$"
    return {"anyOf": [
        {"properties": {"input_format": {"enum": ["auto", "text"]},
                        text_field: {"allOf": [*text_patterns, {"not": {"pattern": ssml.SSML_START}}]}}},
        {"properties": {"input_format": {"enum": ["auto", "ssml"]}, text_field: {"pattern": document}}}]}


def _json(schema: dict, description: str, headers: dict | None = None) -> dict:
    out = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


_RETRY_AFTER = {"Retry-After": {"required": True, "description": "Seconds to wait before retrying",
                                "schema": {"type": "string", "pattern": "^[0-9]+$"}}}


# On a synthesis answer when the request gave `instructions` and the model cannot apply them.
_INSTRUCTIONS_IGNORED = {"X-Instructions-Ignored": {
    "required": False, "description": "true: the request's instructions were ignored (the model's "
                                      "supports_instructions is false, GET /v1/models)",
    "schema": {"type": "string", "enum": ["true"]}}}


def _error(description: str, retry_after: bool = False) -> dict:
    return _json(_ref("Error"), description, _RETRY_AFTER if retry_after else None)


# Answered by the gateway (nginx) in front of the worker, never by the worker itself.
_GATEWAY = {
    "401": _error("Gateway: no or wrong credentials (HTTP basic auth or Authorization: Bearer API key)"),
    "403": _error("Gateway: the client address is not in ALLOW_CIDRS"),
    "413": _error("Over a body limit: the gateway's MAX_JSON_BODY / MAX_UPLOAD_BODY, or the worker's own"),
    "429": _error("Gateway: rate limit (RATE_LIMIT_RPS) or concurrent streams (MAX_STREAMS_PER_CLIENT)",
                  retry_after=True),
}


def _synthesis_errors() -> dict:
    return {
        "400": _error("Invalid input (the message says what to fix): a field out of its schema, or a "
                      "sample rate, language or format this worker does not serve"),
        "404": _error("voice_not_found: a well-formed uploaded voice id that is not stored (deleted?)"),
        **_GATEWAY,
        "429": _error("Gateway: rate limit (RATE_LIMIT_RPS) or concurrent streams (MAX_STREAMS_PER_CLIENT); "
                      "worker: quota_exceeded, the client's daily character quota is spent (until 00:00 UTC)",
                      retry_after=True),
        "503": _error("overloaded (the queue is full), not_ready (loading) or shutting_down", retry_after=True),
        "504": _error("deadline_exceeded: the request took longer than REQUEST_TIMEOUT_S"),
        "500": _error("synthesis_failed: the model failed on this request (a fault of the worker; retry, and its "
                      "characters are not counted against the quota)"),
    }


def build_openapi(version: str, settings, engine, model_names: list[str]) -> dict:
    """The document for this worker; text, voices and languages are the default model's (`engine`)."""
    info = engine.info()
    presets = list(engine.presets())
    rates = settings.rates_for(info.sample_rate)
    requests_ = {
        "TTSRequest": _request_schema(TTSRequest, settings, info.languages, rates, presets, "text", "style"),
        "SpeechRequest": _request_schema(SpeechRequest, settings, info.languages, rates, presets, "input", "voice"),
    }
    for schema in requests_.values():  # the models this worker serves, by name, and OpenAI's aliases
        schema["properties"]["model"] = {
            "description": f"A served model (GET /v1/models); none, or OpenAI's {', '.join(OPENAI_MODEL_NAMES)}, "
                           f"means the default one, {model_names[0]}",
            "anyOf": [{"type": "string", "enum": [*model_names, *OPENAI_MODEL_NAMES]}, {"type": "null"}]}
    components = {name: m.model_json_schema(ref_template=_REF) for name, m in (
        ("TTSResponse", TTSResponse), ("Voice", Voice), ("VoiceList", VoiceList), ("VoiceDeleted", VoiceDeleted),
        ("Error", Error), ("Health", Health), ("Readiness", Readiness), ("SpeechAudioDelta", SpeechAudioDelta),
        ("SpeechAudioDone", SpeechAudioDone), ("SpeechError", SpeechError), ("Usage", Usage))}
    defs = {}
    for schema in [*requests_.values(), *components.values()]:
        defs.update(schema.pop("$defs", {}))
    audio_types = sorted({f.content_type.split(";")[0] for f in FORMATS.values()})
    audio = {"description": "Audio in response_format (chunked as generated when stream=true); with "
                            "stream_format=sse, server-sent events: speech.audio.delta {audio: base64}, then "
                            "speech.audio.done {usage, captions}, or error {error: {code, message}}",
             "content": {**{t: {"schema": {"type": "string", "format": "binary"}} for t in audio_types},
                         # One event (OpenAPI 3.1: the schema describes each): its data is JSON.
                         "text/event-stream": {"schema": {
                             "type": "object", "required": ["data"], "properties": {"data": {
                                 "type": "string", "contentMediaType": "application/json", "contentSchema": {
                                     "oneOf": [_ref("SpeechAudioDelta"), _ref("SpeechAudioDone"),
                                               _ref("SpeechError")]}}}}}},
             "headers": _INSTRUCTIONS_IGNORED}
    voice_id = {"name": "voice_id", "in": "path", "required": True,
                "schema": {"type": "string", "pattern": VOICE_ID_PATTERN}}
    upload = {"type": "object", "required": ["file", "name", "text"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": f"WAV, FLAC, OGG or MP3 of {settings.voice_min_seconds:g}-"
                                f"{settings.voice_max_seconds:g} s, at most {settings.voice_max_bytes} bytes"},
        "name": {"type": "string", "minLength": 1, "maxLength": 64},
        "text": {"type": "string", "minLength": 1, "maxLength": 1000, "description": "What the clip says"}}}
    not_found = _error("voice_not_found: no uploaded voice with this id")
    if info.supports_cloning:
        upload_answers = {"201": _json(_ref("Voice"), "Stored"),
                          "400": _error("Invalid name, transcript, duration, or silent audio"),
                          "415": _error("Not audio this server can decode")}
    else:
        upload_answers = {"400": _error(f"cloning_not_supported: the {info.name} engine cannot clone voices, "
                                        "so it stores none (deploy VoxCPM)")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "VoxBox TTS", "version": version,
                 "description": f"Text-to-speech worker (engine: {info.name}, {info.model}; languages: "
                                f"{', '.join(info.languages)}). WebSocket streaming: GET /v1/stream (see README). "
                                "Through the gateway every path but /healthz needs credentials."},
        "security": [{"basicAuth": []}, {"bearerAuth": []}],
        "paths": {
            "/tts": {"post": {
                "summary": "Synthesise text to a base64 WAV",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("TTSRequest")}}},
                "responses": {"200": _json(_ref("TTSResponse"), "Audio", _INSTRUCTIONS_IGNORED),
                              **_synthesis_errors()}}},
            "/v1/audio/speech": {"post": {
                "summary": "OpenAI-compatible speech",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("SpeechRequest")}}},
                "responses": {"200": audio, **_synthesis_errors()}}},
            "/v1/stream": {"get": {
                "summary": "WebSocket streaming: JSON request, header, binary audio chunks, done (protocol in "
                           "the README)",
                "responses": {"101": {"description": "Switching Protocols (WebSocket)"},
                              "400": _error("A handshake without Sec-WebSocket-Key"),
                              "426": _error("Not a WebSocket handshake"), **_GATEWAY,
                              "503": _error("Too many WebSockets open, or shutting down", retry_after=True)}}},
            "/v1/models": {"get": {
                "summary": "The models this worker serves (OpenAI's list format, with family, phase, sample "
                           "rate, languages, whether it clones and whether it applies instructions)",
                "responses": {"200": _json({"type": "object", "required": ["object", "data"], "properties": {
                    "object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object"}}}},
                    "Models"), **_GATEWAY}}},
            "/v1/voices": {
                "get": {"summary": "Presets and uploaded voices",
                        "responses": {"200": _json(_ref("VoiceList"), "Voices"), **_GATEWAY}},
                "post": {"summary": "Upload a reference clip for cloning",
                         "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": upload}}},
                         "responses": {**upload_answers, **_GATEWAY}}},
            "/v1/voices/{voice_id}": {
                "parameters": [voice_id],
                "get": {"summary": "One uploaded voice",
                        "responses": {"200": _json(_ref("Voice"), "Voice"), "404": not_found, **_GATEWAY}},
                "delete": {"summary": "Delete an uploaded voice",
                           "responses": {"200": _json(_ref("VoiceDeleted"), "Deleted"), "404": not_found,
                                         **_GATEWAY}}},
            "/v1/voices/{voice_id}/audio": {"get": {
                "summary": "An uploaded voice's reference clip (16-bit WAV), to preview it",
                "parameters": [voice_id],
                "responses": {"200": {"description": "The clip", "content": {
                    "audio/wav": {"schema": {"type": "string", "format": "binary"}}}},
                              "404": not_found, **_GATEWAY}}},
            "/healthz": {"get": {"summary": "Process alive (open through the gateway)", "security": [],
                                 "responses": {"200": _json(_ref("Health"), "Alive"),
                                               "503": _json(_ref("Health"), "The model failed to load")}}},
            "/readyz": {"get": {"summary": "Model loaded and warmed up (phase, bootstrap pull status, startup "
                                           "timings); 503 while loading and while shutting down",
                                "responses": {"200": _json(_ref("Readiness"), "Ready"),
                                              "503": _json(_ref("Readiness"), "Not ready", _RETRY_AFTER),
                                              **_GATEWAY}}},
            "/v1/usage": {"get": {
                "summary": "The caller's own usage today (UTC) on this worker: requests, characters, audio "
                           "seconds, and its daily character quota",
                "responses": {"200": _json(_ref("Usage"), "Usage"), **_GATEWAY}}},
            "/info": {"get": {"summary": "Engine, device, limits and startup timings",
                              "responses": {"200": _json({"type": "object"}, "Worker information"), **_GATEWAY}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}},
                                               **_GATEWAY}}},
        },
        "components": {
            "schemas": {**requests_, **components, **defs},
            "securitySchemes": {"basicAuth": {"type": "http", "scheme": "basic"},
                                "bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "One of the gateway's API_KEYS"}},
        },
    }
