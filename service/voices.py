"""Uploaded voices for cloning: validated reference audio + transcript.

Each voice is `audio.wav` (mono, float, at the rate its family's encoder reads: 44.1 kHz for VoxCPM-1.5,
16 kHz for VoxCPM2) and `voice.json` (with the cloning modes it supports), kept by a storage
(service/voice_storage.py): a directory on the models volume by default, or an S3 prefix shared by all
workers (VOICES_URI). A voice is never listed half-written, and ids are generated here: a user-chosen
name never becomes a path.
"""
from __future__ import annotations

import io
import json
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf

from . import text as textmod
from .audio import resample
from .engines import CloneMode, VoicePrompt
from .errors import ErrorKind
from .voice_storage import _ID, AUDIO, STALE_TEMP_S, VOICE_ID_PATTERN, LocalVoiceStorage, VoiceError, VoiceStorage

__all__ = ["STALE_TEMP_S", "VOICE_ID_PATTERN", "Voice", "VoiceError", "VoiceStore", "is_voice_id"]
STORE_RATE = 44100  # when the caller names none
# Voices stored before they recorded a family were made for VoxCPM-1.5 (at its 44.1 kHz), which only
# continues a clip.
LEGACY_FAMILY = "voxcpm"
LEGACY_MODES = (CloneMode.CONTINUATION.value,)


@dataclass(frozen=True)
class Voice:
    id: str
    name: str
    transcript: str
    duration: float
    sample_rate: int
    created_at: float
    family: str  # the model family it was made for (the engine's name); others refuse it
    path: Path
    modes: tuple[str, ...] = LEGACY_MODES  # CloneMode values, the default first (Engine.voice_modes)

    def public(self) -> dict:
        d = asdict(self)
        d.pop("path")
        d["modes"] = list(self.modes)
        return d

    def prompt(self) -> VoicePrompt:
        return VoicePrompt(self.id, self.path / AUDIO, self.transcript, self.modes)


class VoiceStore:
    def __init__(self, root: Path, max_bytes: int, min_seconds: float, max_seconds: float,
                 storage: Optional[VoiceStorage] = None):
        self.root = Path(root)
        self.max_bytes, self.min_seconds, self.max_seconds = max_bytes, min_seconds, max_seconds
        self.storage: VoiceStorage = storage or LocalVoiceStorage(self.root)

    def remove_leftovers(self, now: float | None = None) -> list[str]:
        """Delete what killed processes left behind (half-written uploads older than STALE_TEMP_S,
        half-done deletes). Returns the names removed (called at start)."""
        return self.storage.remove_leftovers(time.time() if now is None else now)

    def _decode(self, data: bytes) -> tuple[np.ndarray, int]:
        """Mono float32 audio and its rate, decoding no more than VOICE_MAX_SECONDS (plus one frame).

        A few hundred kB of FLAC can hold hours of silence: decoding it whole before checking its
        length would take gigabytes, so the length is checked from the header first, and the read
        is bounded in case the header does not say (or lies).
        """
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                rate = f.samplerate
                limit = int(self.max_seconds * rate) + 1
                if f.frames > limit and f.frames < 2 ** 62:  # some formats report "unknown" as huge
                    raise self._bad_duration(f"{f.frames / rate:.1f}s long")
                audio = f.read(frames=limit, dtype="float32", always_2d=True)
                if len(audio) >= limit:
                    raise self._bad_duration(f"longer than {self.max_seconds:g}s")
        except VoiceError:
            raise
        except Exception:
            raise VoiceError(ErrorKind.UNSUPPORTED_MEDIA, "unsupported_audio", "the file is not audio this server can decode; "
                             "upload WAV, FLAC, OGG or MP3") from None
        return audio.mean(axis=1), rate

    def _bad_duration(self, length: str) -> VoiceError:
        return VoiceError(ErrorKind.INVALID, "bad_duration", f"the clip is {length}; it must be between {self.min_seconds:g}s "
                          f"and {self.max_seconds:g}s")

    def create(self, name: str, transcript: str, data: bytes, family: str = LEGACY_FAMILY,
               rate: int = STORE_RATE, modes: tuple[str, ...] = LEGACY_MODES) -> Voice:
        """Store a clip for `family`'s engines, resampled to `rate` (the rate that family encodes at), with
        the cloning `modes` it supports there."""
        name = (name or "").strip()
        if not 1 <= len(name) <= 64 or not name.isprintable():
            raise VoiceError(ErrorKind.INVALID, "invalid_name", "name must be 1-64 printable characters")
        try:
            # A clip cloned as a reference alone (VoxCPM2) needs no transcript; continuing one does.
            reference_only = not (transcript or "").strip() and CloneMode.REFERENCE.value in modes
            transcript = "" if reference_only else textmod.normalize(transcript or "")
        except textmod.TextError as e:
            raise VoiceError(ErrorKind.INVALID, "invalid_transcript", f"transcript: {e}") from None
        if len(transcript) > 1000:
            raise VoiceError(ErrorKind.INVALID, "invalid_transcript", "transcript must be at most 1000 characters")
        if len(data) > self.max_bytes:
            raise VoiceError(ErrorKind.TOO_LARGE, "file_too_large", f"the audio file has {len(data)} bytes; the limit is "
                             f"{self.max_bytes} (VOICE_MAX_BYTES)")
        if not data:
            raise VoiceError(ErrorKind.INVALID, "empty_file", "the audio file is empty")
        audio, source_rate = self._decode(data)
        duration = audio.size / source_rate
        if not self.min_seconds <= duration <= self.max_seconds:
            raise self._bad_duration(f"{duration:.1f}s long")
        finite = bool(np.isfinite(audio).all())
        if finite:
            audio = audio - audio.mean()  # a DC offset is not sound
        if not finite or float(np.sqrt(np.mean(audio ** 2))) < 1e-4:
            raise VoiceError(ErrorKind.INVALID, "silent_audio", "the clip is silent or invalid; record someone speaking")
        peak = float(np.abs(audio).max())
        if peak > 1.0:  # float files may hold any scale; the model expects [-1, 1]
            audio = audio * (0.99 / peak)
        audio = resample(audio, source_rate, rate)
        voice_id = "v_" + secrets.token_hex(8)
        wav = io.BytesIO()
        sf.write(wav, audio, rate, subtype="FLOAT", format="WAV")
        meta = {"id": voice_id, "name": name, "transcript": transcript, "duration": round(duration, 3),
                "sample_rate": rate, "created_at": time.time(), "family": family, "modes": list(modes)}
        self.storage.put(voice_id, {AUDIO: wav.getvalue(),
                                    "voice.json": json.dumps(meta, ensure_ascii=False).encode()})
        return self.get(voice_id)

    @staticmethod
    def _load(meta_json: bytes, d: Path) -> Optional[Voice]:
        try:
            meta = json.loads(meta_json)
            return Voice(path=d, family=meta.get("family", LEGACY_FAMILY),
                         modes=tuple(meta.get("modes", LEGACY_MODES)),
                         **{k: meta[k] for k in ("id", "name", "transcript", "duration", "sample_rate",
                                                            "created_at")})
        except (ValueError, KeyError, TypeError):
            return None

    def get(self, voice_id: str) -> Optional[Voice]:
        if not is_voice_id(voice_id):
            return None
        found = self.storage.fetch(voice_id)
        return self._load(*found) if found else None

    def list(self) -> list[Voice]:
        voices = [self._load(meta, d) for _, meta, d in self.storage.metas()]
        return sorted((v for v in voices if v), key=lambda v: v.created_at)

    def delete(self, voice_id: str) -> bool:
        if not is_voice_id(voice_id):
            return False
        return self.storage.delete(voice_id)


def is_voice_id(name: str) -> bool:
    return bool(_ID.fullmatch(name or ""))
