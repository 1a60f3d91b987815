"""Voice carry: the continuation prompt a finished chunk of a request leaves for the next one.

Each chunk of a long text is generated on its own; without a cloned voice the model's zero-shot voice
may change from one chunk to the next. Continuing from the previous chunk's tail keeps one voice
(Engine.supports_carry; VOICE_CARRY, VOICE_CARRY_MAX_S).
"""
from __future__ import annotations

import numpy as np

from .engines import Continuation
from .text import CJK_RANGES

_QUIET_FRAME_S = 0.02  # a pause between words is at least this long
_SNAP_S = 0.25  # how far from its estimate a cut may move to find one


def continuation(audio: np.ndarray, text: str, rate: int, max_s: float) -> Continuation:
    """The tail of a finished chunk, at most `max_s` seconds of its audio, with the words that tail says.

    The prompt's text must be what its audio says: words the audio lacks would be spoken again, and
    audio the text lacks blurs the model's alignment. With no alignment at hand, where a word starts
    in the audio is estimated from its place in the text (characters spoken at an even pace), then
    moved to the quietest moment nearby (a pause between words), so the audio does not start mid-word.
    """
    text = text.strip()
    audio = np.asarray(audio, dtype=np.float32)
    limit = int(max_s * rate)
    if audio.size <= limit or not text:
        return Continuation(audio[-limit:].copy(), text)
    starts = _word_starts(text)
    room = limit / audio.size  # the share of the chunk the tail may take
    start = next((i for i in starts if (len(text) - i) / len(text) <= room), starts[-1])
    cut = _quiet_point(audio, round(audio.size * start / len(text)), rate, earliest=audio.size - limit)
    return Continuation(audio[cut:].copy(), text[start:])


def _word_starts(text: str) -> list[int]:
    """Where words start: after whitespace, and at every CJK character (Chinese has no spaces)."""
    def cjk(ch: str) -> bool:
        return any(lo <= ch <= hi for lo, hi in CJK_RANGES)

    return [i for i, ch in enumerate(text)
            if not ch.isspace() and (i == 0 or text[i - 1].isspace() or cjk(ch) or cjk(text[i - 1]))]


def _quiet_point(audio: np.ndarray, guess: int, rate: int, earliest: int) -> int:
    """The middle of the quietest frame within _SNAP_S of `guess`, never before `earliest`."""
    frame, snap = max(1, int(_QUIET_FRAME_S * rate)), int(_SNAP_S * rate)
    lo = max(earliest - frame // 2, guess - snap - frame // 2, 0)
    hi = min(guess + snap - frame // 2, audio.size - frame)
    if hi < lo:
        return max(earliest, min(guess, audio.size - 1))
    energy = np.concatenate([[0.0], np.cumsum(audio.astype(np.float64) ** 2)])
    window = energy[lo + frame:hi + frame + 1] - energy[lo:hi + 1]
    return max(earliest, lo + int(np.argmin(window)) + frame // 2)
