"""Voices: presets of the engine plus uploaded reference clips for cloning."""
from __future__ import annotations

import soundfile as sf
from flask import Blueprint, Response, current_app, jsonify, request

from ..encode import encode
from ..voices import VoiceError
from .errors import ApiError

bp = Blueprint("voices", __name__)


def _ctx():
    return current_app.extensions["voxbox"]


@bp.get("/v1/voices")
def list_voices():
    ctx = _ctx()
    presets = [{"id": p.name, "name": p.name, "type": "preset", "description": p.description,
                "languages": list(p.languages)} for p in ctx.engine.presets().values()]
    uploaded = [{**v.public(), "type": "uploaded"} for v in ctx.voices.list()]
    return jsonify({"voices": presets + uploaded, "supports_cloning": ctx.engine.info().supports_cloning})


@bp.post("/v1/voices")
def create_voice():
    ctx = _ctx()
    engine = ctx.engine.info()
    if not engine.supports_cloning:  # it would be stored, listed, and refused at every use
        raise ApiError(400, "cloning_not_supported", f"the {engine.name} engine cannot clone voices, so an uploaded "
                       "clip could never be used; deploy the VoxCPM engine (TTS_ENGINE=voxcpm) to upload voices, "
                       f"or pick a preset: {', '.join(ctx.engine.presets())}")
    upload = request.files.get("file") or request.files.get("audio")
    if upload is None:
        raise ApiError(400, "missing_file", "send the reference clip as multipart field 'file' "
                       "(with fields 'name' and 'text', its transcript)")
    data = upload.read(ctx.settings.voice_max_bytes + 1)
    try:
        voice = ctx.voices.create(request.form.get("name", ""), request.form.get("text", ""), data)
    except VoiceError as e:
        raise ApiError(e.status, e.code, str(e)) from None
    return jsonify(voice.public()), 201


@bp.get("/v1/voices/<voice_id>")
def get_voice(voice_id: str):
    voice = _ctx().voices.get(voice_id)
    if voice is None:
        raise ApiError(404, "voice_not_found", f"no uploaded voice with id '{voice_id}'")
    return jsonify(voice.public())


@bp.get("/v1/voices/<voice_id>/audio")
def voice_audio(voice_id: str):
    """The stored reference clip, so a client can preview a voice before using it."""
    voice = _ctx().voices.get(voice_id)
    if voice is None:
        raise ApiError(404, "voice_not_found", f"no uploaded voice with id '{voice_id}' (GET /v1/voices lists them)")
    # Stored as float WAV for the engine (about 5 MB for 30 s); 16-bit PCM is half that and plays anywhere.
    audio, rate = sf.read(voice.path / "audio.wav", dtype="float32")
    return Response(encode(audio, rate, "wav"), mimetype="audio/wav",
                    headers={"Cache-Control": "private, max-age=3600"})


@bp.delete("/v1/voices/<voice_id>")
def delete_voice(voice_id: str):
    ctx = _ctx()
    if not ctx.voices.delete(voice_id):
        raise ApiError(404, "voice_not_found", f"no uploaded voice with id '{voice_id}'")
    ctx.engine.forget_voice(voice_id)
    return jsonify({"id": voice_id, "deleted": True})
