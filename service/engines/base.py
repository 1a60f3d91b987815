"""The engine interface: load a model onto a device, synthesise text (+ optional voice prompt) to audio."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Hashable, Iterator, Optional, Protocol, Sequence, runtime_checkable

import numpy as np


class EngineError(RuntimeError):
    """The engine failed on a request it accepted (a server-side fault, not bad input)."""


class NothingToSay(ValueError):
    """The engine found nothing speakable in the text it was given (bad input, not a fault)."""


class UnsupportedRequest(ValueError):
    """The engine cannot do what a request asks with this voice (bad input, refused before it is queued).

    `code` is the API's machine-readable reason; the message says what to send instead."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class CloneMode(str, Enum):
    """How a cloned voice conditions generation (VoxCPM2 offers all three; VoxCPM-1.5 continuation only)."""
    REFERENCE = "reference"  # the clip's timbre alone, as an isolated reference (no transcript needed)
    CONTINUATION = "continuation"  # the model continues the clip from its transcript
    REFERENCE_CONTINUATION = "reference_continuation"  # both: the reference, then the clip continued


@dataclass(frozen=True)
class VoicePrompt:
    """A cloned voice: reference audio and its transcript (VoxCPM continues from it), and the cloning
    modes it supports (CloneMode values; without a transcript only the reference one)."""
    voice_id: str
    wav_path: Path
    text: str
    modes: tuple[str, ...] = (CloneMode.CONTINUATION.value,)


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
    # The request's language as checked against EngineInfo.languages; None: not stated (auto).
    lang: Optional[str] = None
    # How an uploaded voice conditions generation (a CloneMode value); None: the engine's choice.
    clone_mode: Optional[str] = None


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
    # CloneMode values this engine clones in (empty: it does not clone); the first is its default.
    clone_modes: tuple[str, ...] = ()
    # The rate uploaded voices are stored at for this engine's family (what its encoder reads); None: sample_rate.
    voice_sample_rate: Optional[int] = None


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

    def voice_modes(self, transcript: str) -> tuple[str, ...]:
        """The cloning modes (CloneMode values) a clip uploaded for this engine with this transcript supports;
        the first is the one used when a request names none."""
        return self.info().clone_modes

    def check(self, prompt: Optional[VoicePrompt], params: SynthesisParams) -> None:
        """Refuse (UnsupportedRequest) what the engine cannot do with this voice and these params; called
        before the request is queued, so the client gets a 400 saying what to send instead."""

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
