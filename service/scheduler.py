"""The request scheduler: a bounded queue in front of the one inference thread that owns the model.

VoxCPM keeps a batch-1 KV cache as module state and CUDA graphs are thread-local, so exactly one
thread loads the model and runs every generation. Request threads submit jobs and read their
events; when the queue is full they get `Overloaded` (HTTP 503 + Retry-After) at once, never a hang.
"""
from __future__ import annotations

import enum
import gc
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional

import numpy as np

from .admission import Waiting, choose_admissions
from .audio import resample, time_stretch
from .carry import continuation
from .engines import Continuation, Engine, NothingToSay, SynthesisParams, VoicePrompt
from .engines.base import BatchingEngine, GenerationBatch
from .metrics import ModelMetrics

log = logging.getLogger(__name__)


class Overloaded(Exception):
    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"the synthesis queue is full ({depth} requests waiting); retry in {retry_after}s")
        self.retry_after = retry_after


class NotReady(Exception):
    pass


class ShuttingDown(NotReady):
    """The worker got SIGTERM: it finishes what it accepted and takes nothing new (service/draining.py)."""


class DeadlineExceeded(Exception):
    pass


class Cancelled(Exception):
    pass


class Phase(str, enum.Enum):
    """Where a model's start-up is: starting -> loading -> warming -> ready, or failed."""
    STARTING = "starting"
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


# What a job's request thread reads from its events queue, in order: audio, then done or failed.
@dataclass
class AudioEvent:
    audio: np.ndarray
    sentence_ends: bool


@dataclass
class Done:
    pass


@dataclass
class Failed:
    error: Exception


JobEvent = AudioEvent | Done | Failed


@dataclass
class Job:
    sentences: list[str]
    preset: str
    prompt: Optional[VoicePrompt]
    params: SynthesisParams
    stream: bool
    timeout_s: float
    endpoint: str = "tts"
    events: "queue.Queue" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: Optional[float] = None
    first_audio_at: Optional[float] = None
    finished_at: Optional[float] = None
    audio_samples: int = 0
    unqueue: Optional[Callable[["Job"], None]] = None  # set by the scheduler that accepted the job

    @property
    def deadline(self) -> float:
        return self.enqueued_at + self.timeout_s

    def cancel(self) -> None:
        """Stop this job: dropped from the queue if still waiting, stopped between chunks if running."""
        self.cancelled.set()
        if self.unqueue is not None:
            self.unqueue(self)

    def results(self, client_gone: Callable[[], bool] = lambda: False,
                poll_s: float = 0.25) -> Iterator[AudioEvent]:
        """Yield this job's audio as it is produced; raise the job's error, or Cancelled/DeadlineExceeded."""
        while True:
            try:
                event = self.events.get(timeout=poll_s)
            except queue.Empty:
                if client_gone():
                    self.cancel()
                    raise Cancelled("client disconnected")
                if time.monotonic() > self.deadline + 5.0:  # the inference thread should have stopped us
                    self.cancel()
                    raise DeadlineExceeded(f"no result within the {self.timeout_s:.0f}s request deadline")
                continue
            if isinstance(event, AudioEvent):
                yield event
            elif isinstance(event, Done):
                return
            else:
                raise event.error


class Scheduler:
    def __init__(self, engine: Engine, metrics: "ModelMetrics", queue_size: int, retry_after_s: int,
                 warmup: bool = True, max_batch: str = "1", batch_cap: int = 1,
                 load_after: Optional[threading.Event] = None, carry_s: float = 0.0):
        self.engine = engine
        # Voice carry (Settings.carry_seconds): the continuation prompt's bound in seconds; 0 is off.
        self.carry_s = carry_s
        self.max_batch = max_batch
        # Most requests one batch may hold: what the request threads can carry (Settings.batch_capacity),
        # so a batch never takes the threads that answer health checks and shed load.
        self.batch_cap = batch_cap
        self.batch_size = 1
        self.metrics = metrics
        self.queue_size = queue_size
        self.retry_after_s = retry_after_s
        self.warmup = warmup
        self.phase = Phase.STARTING
        self.error: Optional[str] = None
        # Start-up cost, filled in as each step ends (shown on /readyz and /info, and as metrics):
        # started_at is the wall-clock time loading began, so it can be placed after the bootstrap pull.
        # Replaced, never mutated: request threads serialise it while the inference thread adds steps.
        self.startup: dict = {}
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._running: Optional[Job] = None
        self._batched_jobs = 0  # jobs inside the batch loop (for the in-flight gauge)
        self._stopping = False
        self.draining = False
        # Models sharing a GPU load one after another (service/models.py sizes each from what is free).
        self.load_after = load_after
        self.loaded = threading.Event()  # set once this model is ready or has failed
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        metrics.queue_depth.set_function(lambda: len(self._pending))
        metrics.in_flight.set_function(
            lambda: len(self._pending) + (1 if self._running else 0) + self._batched_jobs)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._fail_pending(NotReady("the worker is shutting down"))
            self._cv.notify_all()
        self._thread.join(timeout)

    def _fail_pending(self, error: Exception) -> None:
        """Every queued job fails with `error` (call with the lock held)."""
        for job in self._pending:
            job.events.put(Failed(error))
        self._pending.clear()

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    def drain(self) -> None:
        """Refuse new jobs from now on; queued and running ones go on."""
        with self._cv:
            self.draining = True

    def idle(self) -> bool:
        with self._cv:
            return not self._pending and self._running is None and self._batched_jobs == 0

    # -- request side ------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        if self.draining:
            raise ShuttingDown("this worker is shutting down and takes no new requests")
        if not self.ready:
            raise NotReady(self.error or f"the model is not ready yet (phase: {self.phase})")
        with self._cv:
            if len(self._pending) >= self.queue_size:
                self.metrics.rejected.inc()
                raise Overloaded(len(self._pending), self.retry_after_s)
            job.enqueued_at = time.monotonic()
            self._pending.append(job)
            self._cv.notify()
        job.unqueue = self._unqueue
        return job

    def _unqueue(self, job: Job) -> None:
        with self._cv:
            try:
                self._pending.remove(job)
            except ValueError:
                return  # already running (it stops at the next chunk) or finished
        self.metrics.dropped.inc()

    # -- inference thread --------------------------------------------------------------------
    def _run(self) -> None:
        if self.load_after is not None:
            self.load_after.wait()
        try:
            self.phase = Phase.LOADING
            self.startup = {"started_at": time.time()}
            t0 = time.monotonic()
            self.engine.load()
            self._took("load_s", t0)
            log.info("model loaded in %.1fs", self.startup["load_s"])
            if self.engine.supports_batching and not isinstance(self.engine, BatchingEngine):
                raise TypeError(f"the {self.engine.name} engine says it batches but lacks the batching contract "
                                "(service/engines/base.py: BatchingEngine)")
            t0 = time.monotonic()
            self.batch_size = (self.engine.batch_size(self.max_batch, self.batch_cap)
                               if self.engine.supports_batching else 1)
            # Allocated before "ready": a batch that does not fit must fail the load, visibly.
            batched = self.engine.supports_batching and (self.batch_size > 1 or self.engine.batch_single)
            batch = self.engine.make_batch(self.batch_size) if batched else None
            self._took("batch_alloc_s", t0)
            if self.warmup:
                # Warm up the path that will serve: the batched step when there is a batch (the
                # serial loop then never runs), else one synthesis through the engine's own loop.
                self.phase = Phase.WARMING
                t0 = time.monotonic()
                audio = self._warm_batch(batch) if batch is not None else self._warm_serial()
                # Resampling imports torch/torchaudio (seconds): pay that here, not in the first request.
                resample(audio, self.engine.sample_rate, 48000)
                step = "batch_warmup_s" if batch is not None else "warmup_s"
                self._took(step, t0)
                log.info("%s warm-up passed in %.1fs", "batched" if batch is not None else "synthesis",
                         self.startup[step])
            # Everything start-up made (torch, the model, its caches) lives until exit: moved out of the
            # collector's sight, a full collection no longer walks it, which took 0.1-0.3 s with torch
            # imported and stalled every request thread (a /healthz answered in 250 ms under load).
            gc.freeze()
            self.phase = Phase.READY
        except Exception as e:  # a failed load must be visible on /readyz, not a silent dead thread
            log.exception("model failed to load")
            self.error = f"{type(e).__name__}: {e}"
            self.phase = Phase.FAILED
            return
        finally:
            self.loaded.set()
        loop = BatchLoop(self, batch) if batch is not None else None
        try:
            if loop is not None:
                log.info("continuous batching: up to %d requests per generation step", self.batch_size)
                loop.run()
            else:
                self._serial_loop()
        except Exception as e:
            # A fault outside one request's generation (the loop's own bookkeeping): without this the
            # thread would die silently, /readyz would stay ready and every request would wait for its
            # deadline. Failed, /healthz says so (the orchestrator restarts the worker) and nothing waits.
            log.exception("the inference thread stopped")
            self.error = f"the inference thread stopped: {type(e).__name__}: {e}"
            self.phase = Phase.FAILED
            self._fail_all(e, loop)

    def _fail_all(self, error: Exception, loop: Optional["BatchLoop"]) -> None:
        with self._cv:
            self._fail_pending(error)
        if loop is not None:
            loop.fail_all(error)

    def _warm_serial(self) -> np.ndarray:
        preset = next(iter(self.engine.presets()))
        audio = self.engine.synthesize("Hello, this is a warm-up sentence.", preset, None, SynthesisParams())
        if audio.size == 0 or not np.isfinite(audio).all():
            raise RuntimeError("warm-up synthesis produced no valid audio")
        return audio

    def _warm_batch(self, batch) -> np.ndarray:
        """The engine prepares the batch (graphs captured for every batch size), then two short rows go
        through it: a broken batched path fails the load visibly, before the first user waits on it."""
        self.engine.prepare_batch(batch)
        rows = self.engine.batch_add(batch, [("Warm-up.", None, SynthesisParams(max_len=2, seed=i))
                                             for i in range(min(2, batch.max_batch))])
        pieces = []
        while batch.active():
            for row, audio, _ in batch.step():
                if audio.size == 0 or not np.isfinite(audio).all():
                    raise RuntimeError(f"batched warm-up produced no valid audio (row {row} of {rows})")
                pieces.append(audio)
        return np.concatenate(pieces)

    # -- operations for the batch loop (BatchLoop), which runs on the inference thread ----------------
    def take_pending(self, choose: Callable[[list[Job]], list[int]], busy: bool) -> Optional[list[Job]]:
        """Waiting jobs `choose` picks (indices into the queue, oldest first), removed from the queue and
        counted in flight; waits for a job first when the batch is idle. None once the scheduler stops."""
        with self._cv:
            while not self._pending and not busy and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            pending = list(self._pending)
            taken = [pending[i] for i in choose(pending)] if pending else []  # the policy only when someone waits
            for job in taken:
                self._pending.remove(job)
            self._batched_jobs += len(taken)
            return taken

    def left_batch(self, job: Job, event: Optional[JobEvent]) -> None:
        """A job taken by take_pending is over (finished, failed or cancelled): `event` tells its client."""
        self._batched_jobs -= 1
        if event is not None:
            job.events.put(event)

    def _took(self, step: str, t0: float) -> None:
        seconds = time.monotonic() - t0
        self.startup = {**self.startup, step: round(seconds, 4)}
        self.metrics.startup_seconds.labels(step.removesuffix("_s")).set(seconds)

    def _serial_loop(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            try:
                self._execute(job)  # fails only its job on any error
            finally:
                with self._cv:
                    self._running = None

    def _next_job(self) -> Optional[Job]:
        with self._cv:
            while not self._pending and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            job = self._pending.popleft()
            self._running = job
            return job

    def _execute(self, job: Job) -> None:
        job.started_at = time.monotonic()
        self.metrics.queue_wait.observe(job.started_at - job.enqueued_at)
        carries = self.carries(job)
        # A carried job is generated at speed 1 and stretched here (as the batch loop does): the prompt
        # then carries the model's own pace, not a stretched one the next chunk would copy and the
        # stretch compound. Otherwise the engine applies the speed its own way.
        params = replace(job.params, speed=1.0) if carries else job.params
        stretch = job.params.speed if carries and abs(job.params.speed - 1.0) > 1e-3 else None
        carry = None
        try:
            for i, sentence in enumerate(job.sentences):
                self._check(job)
                pieces = []
                if job.stream:
                    for piece in self.engine.stream(sentence, job.preset, job.prompt, params, carry):
                        pieces.append(piece)
                        if stretch is None:
                            self.emit(job, piece, False)
                        self._check(job)
                    if stretch is not None:
                        self.emit(job, time_stretch(np.concatenate(pieces), stretch), False)
                    self.emit(job, np.zeros(0, dtype=np.float32), True)
                else:
                    pieces.append(self.engine.synthesize(sentence, job.preset, job.prompt, params, carry))
                    self.emit(job, time_stretch(pieces[0], stretch or 1.0), True)
                if carries and i + 1 < len(job.sentences):
                    carry = self.carry_from(job, i, pieces)
            job.finished_at = time.monotonic()
            self.record(job)
            job.events.put(Done())
        except Cancelled:
            log.info("job cancelled after %.2fs", time.monotonic() - job.started_at)
        except (DeadlineExceeded, NothingToSay) as e:  # the request's own limits or text: no traceback
            job.events.put(Failed(e))
        except Exception as e:
            log.exception("synthesis failed")
            job.events.put(Failed(e))

    # -- voice carry: each chunk after the first continues from the one before (service/carry.py) --------
    def carries(self, job: Job) -> bool:
        return self.carry_s > 0 and self.engine.supports_carry and len(job.sentences) > 1

    def carry_from(self, job: Job, sentence: int, pieces: list[np.ndarray]) -> Continuation:
        """The prompt that sentence `sentence`, just made as `pieces` (at speed 1), leaves for the next."""
        audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        return continuation(audio, job.sentences[sentence], self.engine.sample_rate, self.carry_s)

    def _check(self, job: Job) -> None:
        if job.cancelled.is_set():
            raise Cancelled()
        if time.monotonic() > job.deadline:
            raise DeadlineExceeded(f"synthesis did not finish within the {job.timeout_s:.0f}s request deadline")

    def emit(self, job: Job, audio: np.ndarray, sentence_ends: bool) -> None:
        if audio.size and job.first_audio_at is None:
            job.first_audio_at = time.monotonic()
            self.metrics.ttfa.labels(job.endpoint).observe(job.first_audio_at - job.enqueued_at)
        job.audio_samples += audio.size
        job.events.put(AudioEvent(audio, sentence_ends))

    def record(self, job: Job) -> None:
        synth = job.finished_at - job.started_at
        audio_s = job.audio_samples / self.engine.sample_rate
        self.metrics.synthesis_seconds.observe(synth)
        self.metrics.audio_seconds.inc(audio_s)
        if audio_s > 0:
            self.metrics.rtf.observe(synth / audio_s)


class BatchLoop:
    """The inference thread's loop with continuous batching: jobs join and leave between steps.

    Each job's sentences go through the batch one after another (a sentence is one row); a job
    whose rows finish leaves, and waiting jobs take the freed rows at the next step.
    """

    def __init__(self, sched: Scheduler, batch: GenerationBatch):
        self.s = sched
        self.batch = batch
        self.rows: dict[int, tuple[Job, int]] = {}  # row -> (job, sentence index)
        # A request another key's rows hold back waits at most this long before the batch drains for it.
        self.drain_after_s = 2.0
        # id(job) -> its current sentence's audio so far (at speed 1), kept when the sentence is needed whole:
        # for a speed change, or as the voice carry's prompt for the next one (Scheduler.carries).
        self.made: dict[int, list] = {}
        self.carry: dict[int, Continuation] = {}  # id(job) -> the prompt its finished sentence left

    def run(self) -> None:
        s = self.s
        while True:
            admitted = s.take_pending(self._choose, busy=bool(self.rows))
            if admitted is None:
                return  # the scheduler is stopping
            self._start([(job, 0) for job in admitted])
            self._drop_cancelled()
            if not self.rows:
                continue
            try:
                results = self.batch.step()
            except Exception as e:  # a failed step fails its jobs, never the worker
                log.exception("batched generation step failed")
                for row, (job, _) in list(self.rows.items()):
                    self._finish(row, job, e)
                continue
            next_sentences = []
            for row, audio, done in results:
                job, sentence = self.rows[row]
                self._audio(job, audio, done)
                if done:
                    del self.rows[row]
                    made = self.made.pop(id(job), [])
                    if sentence + 1 < len(job.sentences):
                        if s.carries(job):  # built now, as the sentence ends: nothing waits for later ones
                            self.carry[id(job)] = s.carry_from(job, sentence, made)
                        next_sentences.append((job, sentence + 1))
                    else:
                        self._complete(job)
            self._start(next_sentences)

    def _choose(self, pending: list[Job]) -> list[int]:
        """Waiting jobs that join now (service/admission.py decides): free rows, a compatible key."""
        now = time.monotonic()
        running_key = self._key(next(iter(self.rows.values()))[0]) if self.rows else None
        return choose_admissions([Waiting(self._key(job), now - job.enqueued_at) for job in pending],
                                 running_key, len(self.rows), self.batch.max_batch, self.drain_after_s)

    def _key(self, job: Job):
        return self.s.engine.batch_key(job.params)

    def _start(self, starts: list[tuple[Job, int]]) -> None:
        """Join (job, sentence index) pairs to the batch, prefilled together."""
        if not starts:
            return
        now = time.monotonic()
        for job, _ in starts:
            if job.started_at is None:
                job.started_at = now
                self.s.metrics.queue_wait.observe(job.started_at - job.enqueued_at)
        try:
            rows = self.s.engine.batch_add(self.batch, [(job.sentences[i], job.prompt, job.params)
                                                        for job, i in starts],
                                           carries=[self.carry.get(id(job)) for job, _ in starts])
        except Exception as e:
            if len(starts) > 1:  # find the request that cannot join; the others still go in
                for one in starts:
                    self._start([one])
                return
            if not isinstance(e, NothingToSay):
                log.exception("could not add a request to the batch")
            self._end(starts[0][0], Failed(e))
            return
        for row, start in zip(rows, starts):
            self.rows[row] = start
            self.carry.pop(id(start[0]), None)

    def fail_all(self, error: Exception) -> None:
        """Every job in the batch fails (the loop cannot go on)."""
        for job, _ in self.rows.values():  # a job holds one row at a time (its sentences go in turn)
            self._end(job, Failed(error))
        self.rows.clear()

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for row, (job, _) in list(self.rows.items()):
            if job.cancelled.is_set():
                self._finish(row, job, None)
            elif now > job.deadline:
                self._finish(row, job, DeadlineExceeded(
                    f"synthesis did not finish within the {job.timeout_s:.0f}s request deadline"))

    def _audio(self, job: Job, audio: np.ndarray, sentence_ends: bool) -> None:
        speed = job.params.speed
        stretch = abs(speed - 1.0) > 1e-3  # tempo change needs the whole sentence
        if stretch or self.s.carries(job):
            self.made.setdefault(id(job), []).append(audio)
        if stretch:
            if not sentence_ends:
                return
            audio = time_stretch(np.concatenate(self.made[id(job)]), speed)
        self.s.emit(job, audio, False)
        if sentence_ends:
            self.s.emit(job, np.zeros(0, dtype=np.float32), True)

    def _finish(self, row: int, job: Job, error: Optional[Exception]) -> None:
        self.batch.cancel(row)
        self.rows.pop(row, None)
        self._end(job, Failed(error) if error else None)

    def _complete(self, job: Job) -> None:
        job.finished_at = time.monotonic()
        self.s.record(job)
        self._end(job, Done())

    def _end(self, job: Job, event: Optional[JobEvent]) -> None:
        self.made.pop(id(job), None)
        self.carry.pop(id(job), None)
        self.s.left_batch(job, event)
