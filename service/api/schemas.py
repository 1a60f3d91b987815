"""Request bodies, validated by pydantic; unknown fields and wrong types are 400s, never silently ignored."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN would pass no bound check sensibly


class VoxCPMKnobs(_Strict):
    cfg_value: Optional[StrictFloat | StrictInt] = Field(None, ge=0.5, le=5.0,
                                                         description="VoxCPM classifier-free guidance")
    inference_timesteps: Optional[StrictInt] = Field(None, ge=1, le=50, description="VoxCPM diffusion steps")
    seed: Optional[StrictInt] = Field(None, ge=0, le=2**31 - 1, description="Random seed (VoxCPM)")
    normalize: Optional[StrictBool] = Field(None, description="VoxCPM text normalisation (numbers, dates)")
    max_len: Optional[StrictInt] = Field(None, ge=4, le=8192,
                                         description="VoxCPM: most tokens (6.25/s) per sentence chunk; "
                                                     "capped by VOXCPM_MAX_LEN")


class TTSRequest(VoxCPMKnobs):
    """The seed contract: text in, base64 WAV out."""
    text: StrictStr = Field(..., description="Text to speak")
    lang: Literal["auto", "en", "zh"] = Field("auto", description="Language of the text; auto detects Chinese")
    style: StrictStr = Field("default", description="Voice: a preset name (GET /v1/voices) or an uploaded voice id")
    sample_rate: Optional[StrictInt] = Field(None, description="Output rate in Hz (default 44100)")


class SpeechRequest(VoxCPMKnobs):
    """OpenAI-compatible /v1/audio/speech."""
    model: StrictStr = Field("voxcpm-1.5", description="Accepted for compatibility: tts-1, tts-1-hd, voxcpm-1.5")
    input: StrictStr = Field(..., description="Text to speak")
    voice: StrictStr = Field("default", description="Preset name, uploaded voice id, or an OpenAI voice name")
    response_format: Literal["wav", "flac", "mp3", "opus", "pcm"] = "mp3"
    speed: StrictFloat | StrictInt = Field(1.0, ge=0.25, le=4.0)
    stream: StrictBool = Field(False, description="Send the audio as it is generated (pcm, wav or opus)")
    stream_format: Literal["audio", "sse"] = Field(
        "audio", description="audio: the body is the audio file; sse: server-sent events "
                             "(speech.audio.delta with base64 audio, then speech.audio.done), always streamed")
    sample_rate: Optional[StrictInt] = Field(None, description="Output rate in Hz (default 44100)")
    lang: Literal["auto", "en", "zh"] = "auto"
