"""Request and response bodies, validated by pydantic; unknown fields and wrong types are 400s, never
silently ignored. The OpenAPI document (openapi.py) is generated from these models."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from ..engines.base import CloneMode
from ..voice_storage import VOICE_ID_PATTERN

# OpenAI sets no limit; delivery directions are a sentence or two, and an engine that applies them
# (VoxCPM2) reads them as part of its prompt, so a bound keeps a request from smuggling a long text in.
MAX_INSTRUCTIONS_CHARS = 1000

# StrictFloat takes JSON integers too (1 is a number) but no strings or booleans, and publishes one
# JSON-Schema number with minimum/maximum (a float|int union published pydantic's own ge/le instead).


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN would pass no bound check sensibly

    @field_validator("inference_timesteps", "seed", "max_len", "sample_rate", mode="before", check_fields=False)
    @classmethod
    def _integral(cls, v):
        """JSON Schema's integer is a value, not a spelling: 40.0 is the integer 40 (40.5 stays refused)."""
        return int(v) if isinstance(v, float) and v.is_integer() else v


class VoxCPMKnobs(_Strict):
    """The generation options every synthesis request body shares (POST /tts, /v1/audio/speech, WebSocket)."""
    instructions: Optional[StrictStr] = Field(
        None, max_length=MAX_INSTRUCTIONS_CHARS,
        description="How to speak, e.g. \"Speak in a cheerful tone.\" (OpenAI's field). Applied by models whose "
                    "supports_instructions is true (GET /v1/models); the others ignore it and answer with the "
                    "header X-Instructions-Ignored: true")
    cfg_value: Optional[StrictFloat] = Field(None, ge=0.5, le=5.0, description="VoxCPM classifier-free guidance")
    inference_timesteps: Optional[StrictInt] = Field(None, ge=1, le=50, description="VoxCPM diffusion steps")
    seed: Optional[StrictInt] = Field(None, ge=0, le=2**31 - 1, description="Random seed (VoxCPM)")
    normalize: Optional[StrictBool] = Field(None, description="VoxCPM text normalisation (numbers, dates)")
    max_len: Optional[StrictInt] = Field(None, ge=4, le=8192,
                                         description="VoxCPM: most tokens (6.25/s) per sentence chunk; "
                                                     "capped by VOXCPM_MAX_LEN")
    clone_mode: Optional[CloneMode] = Field(
        None, description="How an uploaded voice is cloned (its `modes`, GET /v1/voices); default: its first")
    lang: StrictStr = Field("auto", max_length=16, description="Language of the text: auto, or one of the "
                                                              "model's languages (GET /v1/models)")


# Captions: each sentence chunk with its start and end in the audio. Word timings would need an aligner no
# engine here has cheaply (Piper and VoxCPM report no durations), so only sentences are offered.
Timestamps = Optional[Literal["sentence"]]
_TIMESTAMPS = "sentence: return captions, each sentence chunk's text with its start and end (seconds) in the audio"
# SSML: "auto" reads text that starts with <speak> as SSML, "ssml" requires it to, "text" never does (to
# say "<speak>" itself).
InputFormat = Literal["auto", "text", "ssml"]
INPUT_FORMAT_DESCRIPTION = ("auto: SSML when the text starts with <speak>; ssml: the text must be an SSML "
                            "document (<speak>...</speak>); text: never SSML (README: Pauses and pronunciation)")


class TTSRequest(VoxCPMKnobs):
    """The seed contract: text in, base64 WAV out."""
    model: Optional[StrictStr] = Field(None, description="A served model (GET /v1/models); default: the default one")
    text: StrictStr = Field(..., description="Text to speak")
    style: StrictStr = Field("default", description="Voice: a preset name (GET /v1/voices) or an uploaded voice id")
    sample_rate: Optional[StrictInt] = Field(None, description="Output rate in Hz (default: the model's own, "
                                                                "at least 44100)")
    timestamps: Timestamps = Field(None, description=_TIMESTAMPS)
    input_format: InputFormat = Field("auto", description=INPUT_FORMAT_DESCRIPTION)


class SpeechRequest(VoxCPMKnobs):
    """OpenAI-compatible /v1/audio/speech."""
    model: Optional[StrictStr] = Field(None, description="A served model (GET /v1/models); tts-1, tts-1-hd and "
                                                         "gpt-4o-mini-tts mean the default one")
    input: StrictStr = Field(..., description="Text to speak")
    voice: StrictStr = Field("default", description="Preset name, uploaded voice id, or an OpenAI voice name")
    response_format: Literal["wav", "flac", "mp3", "opus", "aac", "pcm"] = "mp3"
    speed: StrictFloat = Field(1.0, ge=0.25, le=4.0)
    stream: StrictBool = Field(False, description="Send the audio as it is generated (pcm, wav, opus or aac)")
    stream_format: Literal["audio", "sse"] = Field(
        "audio", description="audio: the body is the audio file; sse: server-sent events "
                             "(speech.audio.delta with base64 audio, then speech.audio.done), always streamed")
    sample_rate: Optional[StrictInt] = Field(None, description="Output rate in Hz (default: the model's own, "
                                                                "at least 44100)")
    timestamps: Timestamps = Field(None, description=_TIMESTAMPS + ", in the speech.audio.done event (needs "
                                                                   "stream_format sse)")
    input_format: InputFormat = Field("auto", description=INPUT_FORMAT_DESCRIPTION)


class Usage(BaseModel):
    """GET /v1/usage: the caller's own usage today (UTC), counted by this worker."""
    client: str = Field(..., description="key:<16 hex of the API key's sha256>, user:<name>, or anonymous")
    day: str
    requests: int
    characters: int
    audio_seconds: float
    daily_char_quota: Optional[int] = Field(None, description="Characters per UTC day; null: no quota")
    remaining_characters: Optional[int] = None
    resets_at: str


# Responses: only for the document (the views build these bodies), so they say exactly what is sent.

class Caption(BaseModel):
    text: str = Field(..., description="The sentence chunk, as spoken (normalised)")
    start: float = Field(..., description="Seconds into the audio")
    end: float = Field(..., description="Seconds into the audio; the next caption starts here, or after an SSML "
                       "<break> where speech resumes")


class TTSResponse(BaseModel):
    audio_base64: str = Field(..., description="WAV file, base64")
    duration: float = Field(..., description="Seconds of audio")
    latency: float = Field(..., description="Seconds from request to response")
    sample_rate: int
    captions: Optional[list[Caption]] = Field(None, description="With timestamps: sentence")


class Voice(BaseModel):
    id: str = Field(..., pattern=VOICE_ID_PATTERN)
    name: str
    transcript: str
    duration: float
    sample_rate: int
    created_at: float
    family: str = Field(..., description="The model family it was made for; models of other families refuse it")
    modes: list[str] = Field(..., description="Cloning modes it supports (clone_mode); the first is the default")


class VoiceEntry(BaseModel):
    """A preset or an uploaded voice in GET /v1/voices."""
    id: str
    name: str
    type: Literal["preset", "uploaded"]
    description: Optional[str] = None
    languages: Optional[list[str]] = None
    transcript: Optional[str] = None
    duration: Optional[float] = None
    sample_rate: Optional[int] = None
    created_at: Optional[float] = None
    family: Optional[str] = None
    modes: Optional[list[str]] = None


class VoiceList(BaseModel):
    voices: list[VoiceEntry]
    supports_cloning: bool


class VoiceDeleted(BaseModel):
    id: str
    deleted: Literal[True]


class ErrorDetail(BaseModel):
    code: str = Field(..., description="Stable machine-readable reason, e.g. overloaded, unknown_voice")
    message: str = Field(..., description="What happened and what to do")


class Error(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "failed"]
    error: Optional[str] = None


class Readiness(BaseModel):
    status: Literal["ready", "not_ready", "draining"]
    phase: str
    startup: dict
    error: Optional[str] = None
    bootstrap: Optional[dict] = Field(None, description="The model pull's status file, while bootstrap ran one")


# OpenAI's speech server-sent events (stream_format=sse): each event's data is one of these, as JSON.

class SpeechAudioDelta(BaseModel):
    type: Literal["speech.audio.delta"]
    audio: str = Field(..., description="The next piece of the audio stream, base64")


class SpeechUsage(BaseModel):
    input_tokens: int = Field(..., description="Characters of input")
    output_tokens: int = Field(..., description="Audio tokens of the model (6.25 per second for VoxCPM)")
    total_tokens: int


class SpeechAudioDone(BaseModel):
    type: Literal["speech.audio.done"]
    usage: SpeechUsage
    captions: Optional[list[Caption]] = Field(None, description="With timestamps: sentence")


class SpeechError(BaseModel):
    type: Literal["error"]
    error: ErrorDetail
