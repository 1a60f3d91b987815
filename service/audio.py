"""Audio plumbing: resampling (torchaudio), time-stretch, sentence stitching with a crossfade."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate == to_rate or audio.size == 0:
        return audio.astype(np.float32, copy=False)
    import torch
    import torchaudio.functional as AF

    out = AF.resample(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)), from_rate, to_rate)
    return out.numpy()


def time_stretch(audio: np.ndarray, speed: float) -> np.ndarray:
    """Change tempo without changing pitch (phase vocoder), for engines with no native speed control."""
    if abs(speed - 1.0) < 1e-3 or audio.size < 2048:
        return audio
    import librosa

    return librosa.effects.time_stretch(audio.astype(np.float32, copy=False), rate=speed).astype(np.float32)


def to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class Stitcher:
    """Joins consecutive sentence audio with a short equal-power crossfade, incrementally.

    The tail of each finished sentence is held back until the next sentence's first samples arrive,
    so a streamed response never has to rewrite audio it already sent.

    It also records where each sentence ends in the joined audio (`ends`, in samples; captions): in the
    middle of the crossfade into the next sentence, so consecutive sentences meet with no gap or overlap;
    a sentence followed by a pause ends where its audio does, and the next starts after the pause (`starts`):
    a caption is not shown while nothing is said.
    """

    def __init__(self, sample_rate: int, crossfade_ms: float, pauses_s: Sequence[float] = ()):
        self.fade = int(sample_rate * crossfade_ms / 1000.0)
        self._held = np.zeros(0, dtype=np.float32)  # tail of the previous sentence
        self._at_sentence_start = True
        self.ends: list[float] = []  # per finished sentence, once the next one's audio (or flush) places it
        self._emitted = 0  # samples handed out so far
        self._unplaced = 0  # sentences finished whose end waits for the next sentence's first audio
        # Silence (SSML <break>) before the first sentence and after each one: pauses_s[0] first, then
        # pauses_s[i + 1] after sentence i. A pause replaces the crossfade: the sentence ends in full.
        self._pauses = [int(round(p * sample_rate)) for p in pauses_s]
        self._sentences = -1  # sentences finished; -1: the lead pause is not out yet

    def push(self, piece: np.ndarray, sentence_ends: bool) -> np.ndarray:
        piece = np.asarray(piece, dtype=np.float32).reshape(-1)
        out = []
        if self._sentences < 0:
            self._sentences = 0
            out.append(self._silence())
        if self._at_sentence_start and piece.size and self._unplaced:
            n = min(self._held.size, piece.size)  # 0: no crossfade, the next sentence starts right here
            self._place(self._emitted + _size(out) + self._held.size - n + n / 2)
        if self._at_sentence_start and self._held.size and piece.size:
            n = min(self._held.size, piece.size)
            t = np.linspace(0.0, np.pi / 2, n, dtype=np.float32)
            mixed = self._held[-n:] * np.cos(t) + piece[:n] * np.sin(t)
            out += [self._held[:-n], mixed]
            piece = piece[n:]
            self._held = np.zeros(0, dtype=np.float32)
        if piece.size or sentence_ends:
            self._at_sentence_start = sentence_ends
        if sentence_ends and self.fade:
            keep = min(self.fade, piece.size)
            out.append(piece[: piece.size - keep])
            self._held = np.concatenate([self._held, piece[piece.size - keep:]])
        else:
            out.append(piece)
        if sentence_ends:
            self._sentences += 1
            self._unplaced += 1
            silence = self._silence()
            if silence.size:
                out.append(self._held)
                self._held = np.zeros(0, dtype=np.float32)
                self._place(self._emitted + _size(out))
                out.append(silence)
        joined = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
        self._emitted += joined.size
        return joined

    @property
    def starts(self) -> list[float]:
        """Where each placed sentence starts (samples): where the one before ends, after the pause between them."""
        return [(self.ends[i - 1] if i else 0) + self._pause(i) for i in range(len(self.ends))]

    def _pause(self, sentence: int) -> int:
        """Samples of silence before `sentence` (after the one before it, or the lead pause)."""
        return self._pauses[sentence] if sentence < len(self._pauses) else 0

    def _silence(self) -> np.ndarray:
        return np.zeros(self._pause(self._sentences), dtype=np.float32)

    def flush(self) -> np.ndarray:
        held, self._held = self._held, np.zeros(0, dtype=np.float32)
        self._emitted += held.size
        self._place(self._emitted)
        return held

    def _place(self, at: float) -> None:
        self.ends += [at] * self._unplaced
        self._unplaced = 0


def _size(parts: list[np.ndarray]) -> int:
    return sum(p.size for p in parts)
