"""The engine interface: load a model onto a device, synthesise text (+ optional voice prompt) to audio."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Iterator, Optional, Protocol, Sequence, runtime_checkable

import numpy as np


class EngineError(RuntimeError):
    """The engine failed on a request it accepted (a server-side fault, not bad input)."""


class NothingToSay(ValueError):
    """The engine found nothing speakable in the text it was given (bad input, not a fault)."""


@dataclass(frozen=True)
class VoicePrompt:
    """A cloned voice: reference audio and its transcript (VoxCPM continues from it)."""
    voice_id: str
    wav_path: Path
    text: str


@dataclass(frozen=True, eq=False)
class Continuation:
    """The previous chunk of the same request, for the next chunk to continue from (voice carry).

    `audio` is float32 mono at the engine's sample_rate, generated at speed 1 (the scheduler applies a
    request's speed itself when it carries, so a prompt never teaches the model a stretched pace), and
    already trimmed to its tail (VOICE_CARRY_MAX_S); `text` is what that tail says, as sent to the engine.
    Built by the scheduler when a chunk finishes (service/carry.py), so a stream still starts after the
    first chunk. Held in memory only: never cached by voice id.
    """
    audio: np.ndarray
    text: str


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    languages: tuple[str, ...]


@dataclass(frozen=True)
class SynthesisParams:
    speed: float = 1.0
    cfg_value: Optional[float] = None
    inference_timesteps: Optional[int] = None
    seed: Optional[int] = None
    normalize: Optional[bool] = None
    max_len: Optional[int] = None
    # Free-text delivery directions (OpenAI's `instructions`, e.g. "Speak in a cheerful tone."); engines
    # that cannot apply them (EngineInfo.supports_instructions False) ignore them.
    instructions: Optional[str] = None


@dataclass
class EngineInfo:
    name: str
    model: str
    device: str
    sample_rate: int
    languages: tuple[str, ...]
    supports_cloning: bool
    # Audio tokens per second of output: usage figures (OpenAI's output_tokens) count audio in them.
    token_rate: float
    details: dict = field(default_factory=dict)
    supports_instructions: bool = False  # applies SynthesisParams.instructions (others ignore them)


class Engine(ABC):
    """One model on one device. Not thread-safe: the scheduler's inference thread is its only caller."""

    name: str
    sample_rate: int
    max_chunk_chars: int = 200
    supports_batching = False  # engines that can share generation steps override make_batch/batch_add
    batch_single = False  # True: even a batch size of 1 runs through the batched step (its fast path)
    # Engines that make a chunk's audio all at once: a streamed request's first chunk is at most this long,
    # so its first audio comes early (0: the engine streams within a chunk, any first chunk starts fast).
    first_chunk_chars = 0
    # True: a multi-chunk request's chunks after the first get `carry`, the previous chunk's tail (so the
    # whole text keeps one voice). Given a voice as well, the engine decides what conditions the chunk
    # (VoxCPM-1.5: the voice; see its engine). False: `carry` is always None.
    supports_carry = False

    @abstractmethod
    def load(self) -> None:
        """Load weights onto the device; raises with an actionable message if it cannot."""

    @abstractmethod
    def stream(self, text: str, preset: str, prompt: Optional[VoicePrompt],
               params: SynthesisParams, carry: Optional[Continuation] = None) -> Iterator[np.ndarray]:
        """Yield float32 mono chunks at `sample_rate` for one sentence-sized text, as generated."""

    def synthesize(self, text: str, preset: str, prompt: Optional[VoicePrompt],
                   params: SynthesisParams, carry: Optional[Continuation] = None) -> np.ndarray:
        chunks = list(self.stream(text, preset, prompt, params, carry))
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)

    @abstractmethod
    def presets(self) -> dict[str, Preset]:
        """Built-in voices by name."""

    @abstractmethod
    def info(self) -> EngineInfo: ...

    def prepare_batch(self, batch) -> None:
        """Set up what a batch needs before serving (compiled kernels, captured graphs)."""

    def forget_voice(self, voice_id: str) -> None:
        """Drop anything cached for a deleted voice."""


# -- continuous batching: the contract between an engine's batch and the scheduler's batch loop --------
class StepResult(Protocol):
    """One row's part of a generation step: unpacks as (row, audio, done)."""
    row: int
    audio: np.ndarray
    done: bool


@runtime_checkable
class GenerationBatch(Protocol):
    """Rows generated together, one step at a time; rows join and leave between steps.

    Not thread-safe: the scheduler's inference thread is its only caller.
    """
    max_batch: int  # rows one step can hold

    def active(self) -> int:
        """Rows generating now."""

    def free_slots(self) -> int:
        """Rows that can join before the next step."""

    def step(self) -> Sequence[StepResult]:
        """One generation step for every row: each row's new audio, and whether it finished (and left)."""

    def cancel(self, row: int) -> None:
        """Drop a row between steps (its client went away, or its deadline passed); unknown rows are ignored."""


@runtime_checkable
class BatchingEngine(Protocol):
    """What an engine with supports_batching = True provides (see Engine.supports_batching)."""
    batch_single: bool  # even a batch of 1 goes through the batch (its fast path on this device)

    def batch_size(self, requested: str, cap: int) -> int:
        """Rows per step: TTS_MAX_BATCH (a number or auto, decided here after the model is loaded), at most cap."""

    def make_batch(self, max_batch: int) -> GenerationBatch: ...

    def prepare_batch(self, batch: GenerationBatch) -> None:
        """Whatever the batch needs before serving (kernels compiled, graphs captured)."""

    def batch_add(self, batch: GenerationBatch,
                  requests: list[tuple[str, Optional[VoicePrompt], SynthesisParams]],
                  carries: Optional[Sequence[Optional[Continuation]]] = None) -> list[int]:
        """Join (sentence, voice, params) requests, prefilled together; returns their rows.

        carries: one per request (None where that request carries nothing), or None when none does;
        engines without Engine.supports_carry are never given one."""

    def batch_key(self, params: SynthesisParams) -> Optional[Hashable]:
        """Requests whose keys differ cannot share a step (None everywhere: every request can)."""
