"""Uploaded voices for cloning: validated reference audio + transcript, stored on the models volume.

Each voice is a directory `<voices_dir>/<id>/` holding `audio.wav` (mono, float, 44.1 kHz) and
`voice.json`. It is written under a temporary name and renamed into place, so a crash never leaves a
half-written voice, and ids are generated here: a user-chosen name never becomes a path.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf

from . import text as textmod
from .audio import resample
from .engines import VoicePrompt
from .errors import ErrorKind, ServiceError

VOICE_ID_PATTERN = r"^v_[0-9a-f]{16}$"  # ids are generated here (secrets), never chosen by a client
_ID = re.compile(VOICE_ID_PATTERN)
STORE_RATE = 44100  # when the caller names none
# Voices stored before they recorded a family were made for VoxCPM-1.5 (at its 44.1 kHz).
LEGACY_FAMILY = "voxcpm"
# An upload writes its directory in well under a second; one this old was left by a killed process.
# Younger ones may belong to another worker on the same volume (a rollout runs two), so they stay.
STALE_TEMP_S = 15 * 60


class VoiceError(ServiceError):
    """A clip or its details the store cannot take (the kind says whose fault; the message what to do)."""


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

    def public(self) -> dict:
        d = asdict(self)
        d.pop("path")
        return d

    def prompt(self) -> VoicePrompt:
        return VoicePrompt(self.id, self.path / "audio.wav", self.transcript)


class VoiceStore:
    def __init__(self, root: Path, max_bytes: int, min_seconds: float, max_seconds: float):
        self.root = Path(root)
        self.max_bytes, self.min_seconds, self.max_seconds = max_bytes, min_seconds, max_seconds

    def remove_leftovers(self, now: float | None = None) -> list[str]:
        """Delete what killed processes left behind: `.tmp-*` uploads older than STALE_TEMP_S and
        `.del-*` voices already renamed away for deletion. Returns the names removed (called at start)."""
        if not self.root.is_dir():
            return []
        now = time.time() if now is None else now
        removed = []
        for d in self.root.iterdir():
            try:
                stale = d.name.startswith(".del-") or (
                    d.name.startswith(".tmp-") and now - d.lstat().st_mtime > STALE_TEMP_S
                )
            except FileNotFoundError:  # another worker removed it first
                continue
            if stale:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed

    def _ensure_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise VoiceError(
                ErrorKind.FAILED, "voices_dir_unwritable", f"cannot create VOICES_DIR {self.root}: {e}"
            ) from e

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
                if f.frames > limit and f.frames < 2**62:  # some formats report "unknown" as huge
                    raise self._bad_duration(f"{f.frames / rate:.1f}s long")
                audio = f.read(frames=limit, dtype="float32", always_2d=True)
                if len(audio) >= limit:
                    raise self._bad_duration(f"longer than {self.max_seconds:g}s")
        except VoiceError:
            raise
        except Exception:
            raise VoiceError(
                ErrorKind.UNSUPPORTED_MEDIA,
                "unsupported_audio",
                "the file is not audio this server can decode; upload WAV, FLAC, OGG or MP3",
            ) from None
        return audio.mean(axis=1), rate

    def _bad_duration(self, length: str) -> VoiceError:
        return VoiceError(
            ErrorKind.INVALID,
            "bad_duration",
            f"the clip is {length}; it must be between {self.min_seconds:g}s and {self.max_seconds:g}s",
        )

    def create(
        self, name: str, transcript: str, data: bytes, family: str = LEGACY_FAMILY, rate: int = STORE_RATE
    ) -> Voice:
        """Store a clip for `family`'s engines, resampled to `rate` (the rate that family encodes at)."""
        name = (name or "").strip()
        if not 1 <= len(name) <= 64 or not name.isprintable():
            raise VoiceError(ErrorKind.INVALID, "invalid_name", "name must be 1-64 printable characters")
        try:
            transcript = textmod.normalize(transcript or "")
        except textmod.TextError as e:
            raise VoiceError(ErrorKind.INVALID, "invalid_transcript", f"transcript: {e}") from None
        if len(transcript) > 1000:
            raise VoiceError(ErrorKind.INVALID, "invalid_transcript", "transcript must be at most 1000 characters")
        if len(data) > self.max_bytes:
            raise VoiceError(
                ErrorKind.TOO_LARGE,
                "file_too_large",
                f"the audio file has {len(data)} bytes; the limit is {self.max_bytes} (VOICE_MAX_BYTES)",
            )
        if not data:
            raise VoiceError(ErrorKind.INVALID, "empty_file", "the audio file is empty")
        audio, source_rate = self._decode(data)
        duration = audio.size / source_rate
        if not self.min_seconds <= duration <= self.max_seconds:
            raise self._bad_duration(f"{duration:.1f}s long")
        finite = bool(np.isfinite(audio).all())
        if finite:
            audio = audio - audio.mean()  # a DC offset is not sound
        if not finite or float(np.sqrt(np.mean(audio**2))) < 1e-4:
            raise VoiceError(
                ErrorKind.INVALID, "silent_audio", "the clip is silent or invalid; record someone speaking"
            )
        peak = float(np.abs(audio).max())
        if peak > 1.0:  # float files may hold any scale; the model expects [-1, 1]
            audio = audio * (0.99 / peak)
        audio = resample(audio, source_rate, rate)
        voice_id = "v_" + secrets.token_hex(8)
        self._ensure_root()
        tmp = self.root / f".tmp-{voice_id}"
        tmp.mkdir()
        try:
            sf.write(tmp / "audio.wav", audio, rate, subtype="FLOAT")
            meta = {
                "id": voice_id,
                "name": name,
                "transcript": transcript,
                "duration": round(duration, 3),
                "sample_rate": rate,
                "created_at": time.time(),
                "family": family,
            }
            (tmp / "voice.json").write_text(json.dumps(meta, ensure_ascii=False))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)  # the files' names, before the voice becomes visible
            os.rename(tmp, self.root / voice_id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.root)  # the rename itself: without this a power loss can forget the voice
        return self._load(self.root / voice_id)

    def _load(self, d: Path) -> Optional[Voice]:
        try:
            meta = json.loads((d / "voice.json").read_text())
            return Voice(
                path=d,
                family=meta.get("family", LEGACY_FAMILY),
                **{k: meta[k] for k in ("id", "name", "transcript", "duration", "sample_rate", "created_at")},
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def get(self, voice_id: str) -> Optional[Voice]:
        if not _ID.match(voice_id or ""):
            return None
        return self._load(self.root / voice_id)

    def list(self) -> list[Voice]:
        if not self.root.is_dir():
            return []
        voices = [self._load(d) for d in self.root.iterdir() if _ID.match(d.name)]
        return sorted((v for v in voices if v), key=lambda v: v.created_at)

    def delete(self, voice_id: str) -> bool:
        if not _ID.match(voice_id or ""):
            return False
        trash = self.root / f".del-{voice_id}-{secrets.token_hex(4)}"
        try:
            # The rename is the check: of concurrent deletes (other threads, other replicas on the same
            # volume) exactly one wins, and the voice disappears whole.
            os.rename(self.root / voice_id, trash)
        except FileNotFoundError:
            return False
        _fsync_dir(self.root)  # a deleted voice must not come back after a power loss
        shutil.rmtree(trash, ignore_errors=True)
        return True


def is_voice_id(name: str) -> bool:
    return bool(_ID.fullmatch(name or ""))


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed files) durable: fsync on the directory itself."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
