"""A slowed fake engine for serving tests: the scheduler, threads and HTTP are the real ones, the model is
a timer. Each generation step sleeps (as a GPU step leaves the Python side idle) and yields a short tone
per row, so a worker's capacity is known exactly: SLOW_BATCH requests every SLOW_STEPS x SLOW_STEP_S seconds.

Started by gunicorn as `tests.support.slow_engine:create_app()` (see start_worker's `app`); SLOW_CLONING=1
makes it a cloning engine (it accepts voice uploads, as VoxCPM does, and ignores their audio).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np

from service.engines import Continuation, Engine, EngineInfo, Preset, SynthesisParams, VoicePrompt

RATE = 44100  # the default output rate: no resampling, so the test measures scheduling, not DSP


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(RATE * seconds), dtype=np.float32) / RATE
    return (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


class FakeRows:
    """The row bookkeeping of a fake GenerationBatch (service/engines/base.py): rows by number, at most
    max_batch; what a row holds is the fake's own."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.rows: dict = {}

    def active(self) -> int:
        return len(self.rows)

    def free_slots(self) -> int:
        return self.max_batch - len(self.rows)

    def cancel(self, row: int) -> None:
        self.rows.pop(row, None)

    def free_rows(self) -> list[int]:
        return [r for r in range(self.max_batch) if r not in self.rows]


class SlowBatch(FakeRows):
    """A GenerationBatch (service/engines/base.py), like VoxCPM's BatchedGenerator, with a sleep per step."""

    def __init__(self, max_batch: int, step_s: float, steps: int):
        super().__init__(max_batch)
        self.step_s, self.steps = step_s, steps
        self.rows: dict[int, int] = {}  # row -> steps left
        self.chunk = _tone(0.05)

    def add(self, n: int) -> list[int]:
        free = self.free_rows()[:n]
        if len(free) < n:
            raise RuntimeError(f"no free row for {n} requests ({len(self.rows)} of {self.max_batch} busy)")
        for r in free:
            self.rows[r] = self.steps
        return free

    def step(self) -> list[tuple[int, np.ndarray, bool]]:
        time.sleep(self.step_s)
        out = []
        for row in list(self.rows):
            self.rows[row] -= 1
            done = self.rows[row] == 0
            if done:
                del self.rows[row]
            out.append((row, self.chunk, done))
        return out


class SlowEngine(Engine):
    name = "slow-fake"
    sample_rate = RATE
    supports_batching = True

    def __init__(self, step_s: float, steps: int, cloning: bool = False):
        self.step_s, self.steps, self.cloning = step_s, steps, cloning

    def load(self) -> None:
        pass

    def stream(self, text: str, preset: str, prompt: VoicePrompt | None,
               params: SynthesisParams, carry: Continuation | None = None) -> Iterator[np.ndarray]:
        batch = SlowBatch(1, self.step_s, self.steps)
        batch.add(1)
        while batch.active():
            yield batch.step()[0][1]

    def presets(self) -> dict[str, Preset]:
        return {"default": Preset("default", "a 220 Hz tone", ("en",))}

    def info(self) -> EngineInfo:
        return EngineInfo(name=self.name, model="timer", device="cpu", sample_rate=RATE, languages=("en",),
                          supports_cloning=self.cloning, token_rate=6.25)

    def batch_size(self, requested: str, cap: int) -> int:
        return min(cap, int(requested)) if requested.strip().isdigit() else cap

    def make_batch(self, max_batch: int) -> SlowBatch:
        return SlowBatch(max_batch, self.step_s, self.steps)

    def batch_add(self, batch: SlowBatch, requests: list, carries: list | None = None) -> list[int]:
        return batch.add(len(requests))

    def batch_key(self, params: SynthesisParams) -> int:
        return 0


def create_app():
    from service.app import create_app as real_create_app
    from service.settings import load_settings

    engine = SlowEngine(float(os.environ.get("SLOW_STEP_S", "0.05")), int(os.environ.get("SLOW_STEPS", "10")),
                        cloning=os.environ.get("SLOW_CLONING") == "1")
    return real_create_app(load_settings(), engine=engine)
