"""A fake engine that records what each chunk's generation was given (tests/test_voice_carry.py).

Its audio differs per text (noise seeded by the text, 50 ms per character), so a test can tell which
chunk a continuation prompt was cut from. It generates in 100 ms steps, one at a time (stream) or
through a GenerationBatch, as a real engine does; `before` runs as each generation starts, so a test
can hold one back.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from service.engines import Continuation, Engine, EngineInfo, Preset, SynthesisParams, VoicePrompt

from .slow_engine import FakeRows

RATE = 16000
SECONDS_PER_CHAR = 0.05
STEP = RATE // 10


def speech(text: str) -> np.ndarray:
    """The audio this engine makes for `text`."""
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    return (0.3 * rng.standard_normal(int(RATE * SECONDS_PER_CHAR * len(text)))).astype(np.float32)


@dataclass
class Call:
    """One generation: what it was asked to say, and with which voice, params and carry."""
    text: str
    prompt: Optional[VoicePrompt]
    params: SynthesisParams
    carry: Optional[Continuation]
    batched: bool


class RecordingBatch(FakeRows):
    """A GenerationBatch (service/engines/base.py): each row yields its text's audio a step at a time."""

    def __init__(self, max_batch: int):
        super().__init__(max_batch)
        self.rows: dict[int, list[np.ndarray]] = {}  # row -> pieces still to come

    def add(self, audio: np.ndarray) -> int:
        row = self.free_rows()[0]
        self.rows[row] = pieces(audio)
        return row

    def step(self) -> list[tuple[int, np.ndarray, bool]]:
        out = []
        for row in list(self.rows):
            left = self.rows[row]
            piece = left.pop(0)
            if not left:
                del self.rows[row]
            out.append((row, piece, not left))
        return out


def pieces(audio: np.ndarray) -> list[np.ndarray]:
    return [audio[i:i + STEP] for i in range(0, audio.size, STEP)]


class RecordingEngine(Engine):
    name = "recording-fake"
    sample_rate = RATE
    supports_batching = True

    def __init__(self, carry: bool = True):
        self.supports_carry = carry
        self.calls: list[Call] = []
        self.before: Callable[[str], None] = lambda text: None

    def load(self) -> None:
        pass

    def _start(self, text, prompt, params, carry, batched) -> np.ndarray:
        self.before(text)
        self.calls.append(Call(text, prompt, params, carry, batched))
        return speech(text)

    def stream(self, text: str, preset: str, prompt: Optional[VoicePrompt], params: SynthesisParams,
               carry: Optional[Continuation] = None) -> Iterator[np.ndarray]:
        yield from pieces(self._start(text, prompt, params, carry, False))

    def presets(self) -> dict[str, Preset]:
        return {"default": Preset("default", "seeded noise", ("en",))}

    def info(self) -> EngineInfo:
        return EngineInfo(name=self.name, model="recorder", device="cpu", sample_rate=RATE, languages=("en",),
                          supports_cloning=True, token_rate=10.0)

    def batch_size(self, requested: str, cap: int) -> int:
        return min(cap, int(requested)) if requested.strip().isdigit() else 1  # auto: serial, as VoxCPM on CPU

    def make_batch(self, max_batch: int) -> RecordingBatch:
        return RecordingBatch(max_batch)

    def batch_add(self, batch: RecordingBatch, requests: list, carries: Optional[list] = None) -> list[int]:
        carries = carries or [None] * len(requests)
        return [batch.add(self._start(text, prompt, params, carry, True))
                for (text, prompt, params), carry in zip(requests, carries)]

    def batch_key(self, params: SynthesisParams) -> None:
        return None
