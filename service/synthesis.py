"""The service layer between HTTP and the scheduler: validate text and voice, queue a job, shape its audio."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from . import ssml, text as textmod
from .errors import ErrorKind, ServiceError
from .lexicon import EMPTY, Lexicon
from .audio import Stitcher, resample
from .encode import StreamEncoder
from .engines import Engine, NothingToSay, SynthesisParams, UnsupportedRequest, VoicePrompt
from .scheduler import Cancelled, DeadlineExceeded, Job, NotReady, Overloaded, Scheduler, ShuttingDown
from .settings import Settings
from .usage import ANONYMOUS, QuotaExceeded, Usage
from .voices import VoiceStore, is_voice_id

log = logging.getLogger(__name__)

# OpenAI SDK users send these names; they all mean "the engine's default voice" here.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")


@dataclass
class Plan:
    """A request's text, ready to queue: its chunks, the silence around them (SSML breaks), its size."""
    chunks: list[str]
    pauses: tuple[float, ...]  # seconds before chunk 0, then after each chunk (len(chunks) + 1)
    characters: int  # what usage counts: the input (SSML: its text without the markup)


@dataclass
class Prepared:
    job: Job
    sample_rate: int
    received_at: float
    stitcher: Stitcher  # joins the job's sentences and their pauses; knows where each one ends (captions)
    client: str
    characters: int  # the input's, as usage counts them (SSML: without the markup)


@dataclass(frozen=True)
class Caption:
    """One sentence chunk's text and where it is heard, in seconds of the output audio."""
    text: str
    start: float
    end: float


@dataclass
class Result:
    audio: np.ndarray
    sample_rate: int
    latency: float


class SynthesisService:
    def __init__(self, settings: Settings, engine: Engine, scheduler: Scheduler, voices: VoiceStore, usage: Usage,
                 lexicon: Lexicon = EMPTY):
        self.settings = settings
        self.engine = engine
        self.scheduler = scheduler
        self.voices = voices
        self.lexicon = lexicon
        self.usage = usage
        self.ssml_limits = ssml.Limits(settings.ssml_max_break_s, settings.ssml_max_total_break_s)

    # -- validation --------------------------------------------------------------------------
    def resolve_voice(self, name: str) -> tuple[str, Optional[VoicePrompt]]:
        presets = self.engine.presets()
        default = next(iter(presets))
        if name in ("", "default") or name in OPENAI_VOICES:
            return default, None
        if name in presets:
            return name, None
        voice = self.voices.get(name)
        if voice is not None:
            if not self.engine.info().supports_cloning:
                raise ServiceError(
                    ErrorKind.INVALID,
                    "voice_not_supported",
                    f"voice '{name}' is a cloned voice, and the "
                    f"{self.engine.name} engine cannot clone; use a preset: {', '.join(presets)}",
                )
            if voice.family != self.engine.name:
                raise ServiceError(
                    ErrorKind.INVALID,
                    "voice_model_mismatch",
                    f"voice '{name}' was made for {voice.family} models, and "
                    f"this model is {self.engine.name}; use it with a {voice.family} model "
                    f"(GET /v1/models), or upload the clip again for this one (POST /v1/voices with "
                    "field 'model')",
                )
            return default, voice.prompt()
        if is_voice_id(name):  # well-formed: a voice that was deleted, or never uploaded here
            raise ServiceError(
                ErrorKind.NOT_FOUND,
                "voice_not_found",
                f"no uploaded voice with id '{name}' (GET /v1/voices lists "
                "them); upload one with POST /v1/voices or use a preset",
            )
        raise ServiceError(
            ErrorKind.INVALID,
            "unknown_voice",
            f"unknown voice '{name}'; use a preset "
            f"({', '.join(presets)}), an uploaded voice id (GET /v1/voices) or 'default'",
        )

    def sample_rates(self) -> tuple[int, ...]:
        """Output rates this model serves (its own among them)."""
        return self.settings.rates_for(self.engine.sample_rate)

    def default_sample_rate(self) -> int:
        return self.settings.default_rate_for(self.engine.sample_rate)

    def check_rate(self, rate: Optional[int]) -> int:
        rate = self.default_sample_rate() if rate is None else rate
        if rate not in self.sample_rates():
            raise ServiceError(
                ErrorKind.INVALID,
                "unsupported_sample_rate",
                f"sample_rate {rate} is not supported; use one of {', '.join(map(str, self.sample_rates()))}",
            )
        return rate

    def check_voice(self, prompt: Optional[VoicePrompt], params: SynthesisParams) -> None:
        """The cloning mode a request asks for, and what the engine can do with this voice and params."""
        if params.clone_mode is not None:
            if prompt is None:
                raise ServiceError(ErrorKind.INVALID, "clone_mode_without_voice",
                                   "clone_mode applies to an uploaded voice; name one (GET /v1/voices) or drop "
                                   "clone_mode")
            if params.clone_mode not in prompt.modes:
                raise ServiceError(ErrorKind.INVALID, "unsupported_clone_mode",
                                   f"voice '{prompt.voice_id}' clones with the {self.engine.name} engine in "
                                   f"{', '.join(prompt.modes)} only; send one of those or leave clone_mode out")
        try:
            self.engine.check(prompt, params)
        except UnsupportedRequest as e:
            raise ServiceError(ErrorKind.INVALID, e.code, str(e)) from None

    def prepare(self, raw: str, lang: str, stream: bool = False, input_format: str = "auto") -> Plan:
        """Checked, normalised text in chunks, with the lexicon applied and SSML breaks placed between
        chunks; a stream starts with a short chunk where the engine makes a chunk's audio all at once
        (Engine.first_chunk_chars; STREAM_SHORT_FIRST_CHUNK).

        input_format: "ssml" parses the text as SSML, "text" never does, "auto" does when it starts
        with <speak>. Text is never chunked across a break, so each pause falls exactly where it was written.
        """
        if len(raw) > self.settings.max_text_chars:
            raise ServiceError(
                ErrorKind.TOO_LARGE,
                "text_too_long",
                f"text has {len(raw)} characters; the limit is "
                f"{self.settings.max_text_chars} (MAX_TEXT_CHARS). Split it into several requests",
            )
        spoken = self._spoken(raw, input_format)
        try:
            texts = [textmod.normalize(piece.text) for piece in spoken.pieces] or [textmod.normalize("")]
        except textmod.TextError as e:
            raise ServiceError(ErrorKind.INVALID, "invalid_text", str(e)) from None
        text = "\n".join(texts)
        langs = self.engine.info().languages
        # auto reads Chinese characters as Chinese; other languages are told by the model itself.
        wanted = lang if lang != "auto" else "zh" if textmod.has_cjk(text) else None
        if wanted is not None and wanted not in langs:  # before the speakable check: this says more
            way_out = (" For Chinese, deploy the VoxCPM engine: TTS_ENGINE=voxcpm with MODEL_URI naming its "
                       "weights, or a VoxCPM model in MODELS (README: \"Deploy on a GPU instance\")"
                       if wanted == "zh" else " (GET /v1/models lists each model's languages)")
            raise ServiceError(
                ErrorKind.INVALID,
                "unsupported_language",
                f"the {self.engine.name} engine speaks {', '.join(langs)} only; this text needs '{wanted}'.{way_out}",
            )
        if not textmod.has_speakable(text, langs):
            raise _nothing_to_say(langs)
        short_first = stream and self.settings.stream_short_first_chunk
        max_chars = min(self.settings.max_chunk_chars, self.engine.max_chunk_chars)
        chunks: list[str] = []
        pauses = [spoken.lead_s]
        for piece, piece_text in zip(spoken.pieces, texts):
            if not textmod.has_speakable(piece_text, langs):  # punctuation between two breaks: only the pause
                pauses[-1] += piece.pause_s
                continue
            part = textmod.split_sentences(piece_text, max_chars,
                                           first_max=self.engine.first_chunk_chars if short_first and not chunks
                                           else 0)
            chunks += part
            pauses += [0.0] * (len(part) - 1) + [piece.pause_s]
        return Plan(chunks, tuple(pauses), len(raw) if spoken.plain else spoken.written)

    def _spoken(self, raw: str, input_format: str) -> ssml.Spoken:
        """The text to say and its pauses: SSML parsed, the lexicon applied to the text as written."""
        if input_format == "text" or (input_format == "auto" and not ssml.is_ssml(raw)):
            return ssml.Spoken([ssml.Piece(self.lexicon.apply(raw))], plain=True)
        try:
            return ssml.parse(raw, self.ssml_limits, self.lexicon.apply)
        except ssml.SSMLError as e:
            raise ServiceError(ErrorKind.INVALID, e.code, str(e)) from None

    # -- execution ---------------------------------------------------------------------------
    def start(self, text: str, lang: str, voice: str, params: SynthesisParams, rate: Optional[int], stream: bool,
              endpoint: str, input_format: str = "auto", client: str = ANONYMOUS) -> Prepared:
        """The one way a request becomes a queued job, for every endpoint: output rate, text, voice, the
        client's quota, queue."""
        rate = self.check_rate(rate)
        plan = self.prepare(text, lang, stream, input_format)
        try:
            self.usage.admit(client, plan.characters)
        except QuotaExceeded as e:
            raise ServiceError(ErrorKind.QUOTA, "quota_exceeded", str(e), retry_after=e.retry_after) from None
        try:
            prep = self.submit(plan, voice, params, rate, stream, endpoint, client)
        except ServiceError:  # not queued (a full queue, an unknown voice): its characters are not spent
            self.usage.refund(client, plan.characters)
            raise
        self.usage.accepted(client, plan.characters)
        return prep

    def submit(
        self, plan: Plan, voice: str, params: SynthesisParams, rate: int, stream: bool, endpoint: str, client: str,
    ) -> Prepared:
        received = time.monotonic()
        preset, prompt = self.resolve_voice(voice)
        self.check_voice(prompt, params)
        job = Job(
            sentences=plan.chunks,
            preset=preset,
            prompt=prompt,
            params=params,
            stream=stream,
            timeout_s=self.settings.request_timeout_s,
            endpoint=endpoint,
        )
        try:
            self.scheduler.submit(job)
        except Overloaded as e:
            raise ServiceError(ErrorKind.OVERLOADED, "overloaded", str(e), retry_after=e.retry_after) from None
        except ShuttingDown as e:
            raise shutting_down(str(e), self.settings.retry_after_s) from None
        except NotReady as e:
            raise ServiceError(
                ErrorKind.UNAVAILABLE, "not_ready", f"{e}; retry shortly", retry_after=self.settings.retry_after_s
            ) from None
        stitcher = Stitcher(self.engine.sample_rate, self.settings.crossfade_ms, plan.pauses)
        return Prepared(job, rate, received, stitcher, client, plan.characters)

    def collect(self, prep: Prepared, client_gone: Callable[[], bool]) -> Result:
        stitcher = prep.stitcher
        parts = []
        try:
            for event in self._events(prep, client_gone):
                parts.append(stitcher.push(event.audio, event.sentence_ends))
        except ServiceError as e:
            self._unspent(prep, e)
            raise
        parts.append(stitcher.flush())
        if sum(p.size for p in parts) == 0:
            raise _nothing_to_say()
        audio = resample(np.concatenate(parts), self.engine.sample_rate, prep.sample_rate)
        self.usage.audio(prep.client, audio.size / prep.sample_rate)
        return Result(audio, prep.sample_rate, time.monotonic() - prep.received_at)

    def stream(self, prep: Prepared, encoder: StreamEncoder, client_gone: Callable[[], bool]) -> Iterator[bytes]:
        """Encoded bytes as the engine produces audio; closing the iterator cancels the job.

        Nothing is yielded before the first audio exists, so a job that fails early (deadline, engine
        error) still gets a proper JSON error status instead of a 200 followed by a broken stream.
        """
        stitcher = prep.stitcher
        # Seconds the consumer took: a piece counts once it asks for the next one. A WebSocket that is
        # cancelled, or a client that went away, leaves the last piece unsent, and usage must not count it.
        delivered = 0.0
        try:
            first = True
            for event in self._events(prep, client_gone):
                data = encoder.push(stitcher.push(event.audio, event.sentence_ends))
                if first:
                    data, first = encoder.header() + data, False
                if data:
                    yield data
                delivered = encoder.seconds
            tail = stitcher.flush()
            if first and tail.size == 0:  # the engine made no audio at all: say so, not a 200 with none
                raise _nothing_to_say()
            yield (encoder.header() if first else b"") + encoder.push(tail) + encoder.close()
            delivered = encoder.seconds
        except ServiceError as e:
            if first:
                self._unspent(prep, e)
            if first or e.code != "client_closed_request":
                raise
            log.info("stream stopped: the client disconnected")
        finally:
            prep.job.cancel()  # no-op when finished; stops generation when the client went away
            self.usage.audio(prep.client, delivered)

    def _unspent(self, prep: Prepared, error: ServiceError) -> None:
        """A request that failed on our side before the client got any audio gives its characters back to the
        quota: it was told to retry (503) or that the worker failed (500), and the retry must not pay twice."""
        if error.kind in (ErrorKind.UNAVAILABLE, ErrorKind.FAILED):
            self.usage.refund(prep.client, prep.characters)

    def captions(self, prep: Prepared) -> list[Caption]:
        """Each sentence chunk with its start and end, once the job's audio is complete (collect or stream)."""
        rate, stitcher = self.engine.sample_rate, prep.stitcher
        return [Caption(text, round(start / rate, 3), round(end / rate, 3))
                for text, start, end in zip(prep.job.sentences, stitcher.starts, stitcher.ends)]

    def _events(self, prep: Prepared, client_gone: Callable[[], bool]):
        try:
            yield from prep.job.results(client_gone)
        except DeadlineExceeded as e:
            raise ServiceError(
                ErrorKind.DEADLINE, "deadline_exceeded", f"{e}; send shorter text or raise REQUEST_TIMEOUT_S"
            ) from None
        except Cancelled:
            raise ServiceError(ErrorKind.CLIENT_GONE, "client_closed_request", "the client disconnected") from None
        except NotReady as e:
            raise ServiceError(
                ErrorKind.UNAVAILABLE, "not_ready", str(e), retry_after=self.settings.retry_after_s
            ) from None
        except NothingToSay as e:
            raise ServiceError(ErrorKind.INVALID, "nothing_to_say", str(e)) from None
        except Exception as e:
            raise ServiceError(ErrorKind.FAILED, "synthesis_failed", f"synthesis failed: {e}") from e


def shutting_down(what: str, retry_after: int) -> ServiceError:
    return ServiceError(
        ErrorKind.UNAVAILABLE,
        "shutting_down",
        f"{what} (a restart or rollout); retry, and its replacement or another replica will answer",
        retry_after=retry_after,
    )


def _nothing_to_say(languages: tuple[str, ...] = ()) -> ServiceError:
    scripts = {"en": "Latin letters or digits", "zh": "Chinese characters"}
    if any(lang not in scripts for lang in languages):
        scripts, languages = {"any": "letters or digits"}, ("any",)
    readable = " or ".join(scripts[lang] for lang in languages if lang in scripts)
    return ServiceError(
        ErrorKind.INVALID,
        "nothing_to_say",
        "the text has nothing speakable (only punctuation or symbols"
        + (f", or no {readable}" if readable else "")
        + "); send words",
    )
