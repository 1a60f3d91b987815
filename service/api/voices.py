"""Voices: presets of the engine plus uploaded reference clips for cloning."""
from __future__ import annotations

import soundfile as sf
from flask import Blueprint, Response, current_app, jsonify, request

from ..encode import encode
from ..voice_storage import AUDIO
from .errors import ApiError
from .models import model_or_400

bp = Blueprint("voices", __name__)


def _ctx():
    return current_app.extensions["voxbox"]


@bp.get("/v1/voices")
def list_voices():
    ctx = _ctx()
    presets = [{"id": p.name, "name": p.name, "type": "preset", "description": p.description,
                "languages": list(p.languages)} for p in ctx.engine.presets().values()]
    uploaded = [{**v.public(), "type": "uploaded"} for v in ctx.voices.list()]
    return jsonify({"voices": presets + uploaded,
                    "supports_cloning": any(rt.engine.info().supports_cloning for rt in ctx.models)})


@bp.post("/v1/voices")
def create_voice():
    """Field 'model' (optional, default: the default model) says which model the voice is for: it is
    stored at the rate that model's family encodes at, says the cloning modes it supports there (without
    a transcript, VoxCPM2 clones from it as a reference only), and only models of that family accept it."""
    ctx = _ctx()
    model = model_or_400(ctx, request.form.get("model"))
    engine = model.engine.info()
    if not engine.supports_cloning:  # it would be stored, listed, and refused at every use
        cloners = [rt.name for rt in ctx.models if rt.engine.info().supports_cloning]
        where = (f"name a model that can (field 'model': {', '.join(cloners)})" if cloners else
                 "deploy the VoxCPM engine (TTS_ENGINE=voxcpm) to upload voices")
        raise ApiError(400, "cloning_not_supported", f"the {engine.name} engine (model '{model.name}') cannot clone "
                       f"voices, so an uploaded clip could never be used; {where}, "
                       f"or pick a preset: {', '.join(model.engine.presets())}")
    upload = request.files.get("file") or request.files.get("audio")
    if upload is None:
        raise ApiError(400, "missing_file", "send the reference clip as multipart field 'file' "
                       "(with fields 'name' and 'text', its transcript)")
    data = upload.read(ctx.settings.voice_max_bytes + 1)
    transcript = request.form.get("text", "")
    voice = ctx.voices.create(request.form.get("name", ""), transcript, data, family=engine.name,
                              rate=engine.voice_sample_rate or engine.sample_rate,
                              modes=model.engine.voice_modes(transcript))
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
    audio, rate = sf.read(voice.path / AUDIO, dtype="float32")
    return Response(encode(audio, rate, "wav"), mimetype="audio/wav",
                    headers={"Cache-Control": "private, max-age=3600"})


@bp.delete("/v1/voices/<voice_id>")
def delete_voice(voice_id: str):
    ctx = _ctx()
    if not ctx.voices.delete(voice_id):
        raise ApiError(404, "voice_not_found", f"no uploaded voice with id '{voice_id}'")
    for rt in ctx.models:
        rt.engine.forget_voice(voice_id)
    return jsonify({"id": voice_id, "deleted": True})
