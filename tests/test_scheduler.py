"""The scheduler with the real embedded engine, in-process: queue bounds, deadlines, cancellation."""
import threading
import time

import pytest

from service.engines import SynthesisParams
from service.engines.embedded import EmbeddedEngine
from service.metrics import Metrics
from service.scheduler import Cancelled, DeadlineExceeded, Job, NotReady, Overloaded, Scheduler

LONG = ["This is a fairly long sentence that keeps the inference thread busy for a while, number %d." % i
        for i in range(40)]


@pytest.fixture(scope="module")
def engine():
    e = EmbeddedEngine()
    e.load()
    return e


@pytest.fixture
def make_scheduler(engine):
    made = []

    def make(queue_size=2, warmup=False):
        s = Scheduler(engine, Metrics().for_model("test"), queue_size=queue_size, retry_after_s=3, warmup=warmup)
        s.engine.load = lambda: None  # the module fixture loaded it once already
        s.start()
        deadline = time.monotonic() + 10
        while not s.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def occupy(s):
    """Submit a long job and wait until the inference thread is busy with it."""
    busy = s.submit(job(LONG))
    while busy.started_at is None:
        time.sleep(0.005)
    return busy


def sample(s, name, labels=None):
    return s.metrics.registry.get_sample_value(name, {"model": s.metrics.model, **(labels or {})})


def job(sentences, timeout=60.0, stream=True):
    return Job(sentences=sentences, preset="joe", prompt=None, params=SynthesisParams(), stream=stream,
               timeout_s=timeout)


def test_submit_before_ready_is_refused(engine):
    s = Scheduler(engine, Metrics().for_model("test"), queue_size=2, retry_after_s=3)
    with pytest.raises(NotReady, match="phase: starting"):
        s.submit(job(["hi."]))


def test_full_queue_is_refused_at_once_with_retry_after(make_scheduler):
    s = make_scheduler(queue_size=2)
    busy = occupy(s)
    queued = [s.submit(job(["Hello."])) for _ in range(2)]
    t0 = time.monotonic()
    with pytest.raises(Overloaded) as e:
        s.submit(job(["Hello."]))
    assert time.monotonic() - t0 < 0.1
    assert e.value.retry_after == 3 and "queue is full (2 requests waiting)" in str(e.value)
    assert sample(s, "voxbox_queue_depth") == 2
    assert sample(s, "voxbox_in_flight") == 3
    assert sample(s, "voxbox_rejected_total") == 1
    busy.cancel()
    for q in queued:
        assert sum(ev.audio.size for ev in q.results()) > 0


def test_cancelled_job_leaves_the_queue_and_frees_its_place(make_scheduler):
    s = make_scheduler(queue_size=1)
    busy = occupy(s)
    waiting = s.submit(job(["Hello."]))
    waiting.cancel()
    replacement = s.submit(job(["Hello there."]))  # the place is free again
    assert sample(s, "voxbox_dropped_total") == 1
    busy.cancel()
    assert sum(ev.audio.size for ev in replacement.results()) > 0
    assert waiting.started_at is None  # never synthesised


def test_running_job_stops_between_chunks_when_cancelled(make_scheduler):
    s = make_scheduler()
    j = s.submit(job(LONG))
    got = 0
    for ev in j.results():
        got += 1
        if got == 2:
            j.cancel()
            break
    t0 = time.monotonic()
    follow = s.submit(job(["Next request."]))
    list(follow.results())
    assert time.monotonic() - t0 < 5  # the long job did not run to its end first
    assert j.finished_at is None


def test_deadline_is_enforced(make_scheduler):
    s = make_scheduler()
    j = s.submit(job(LONG, timeout=0.3))
    with pytest.raises(DeadlineExceeded, match="0s request deadline|deadline"):
        for _ in j.results():
            pass


def test_client_gone_cancels_a_waiting_job(make_scheduler):
    s = make_scheduler(queue_size=2)
    busy = occupy(s)
    waiting = s.submit(job(["Hello."]))
    gone = threading.Event()
    threading.Timer(0.3, gone.set).start()
    with pytest.raises(Cancelled):
        list(waiting.results(client_gone=gone.is_set, poll_s=0.05))
    assert sample(s, "voxbox_dropped_total") == 1
    busy.cancel()


def test_metrics_record_ttfa_and_audio_seconds(make_scheduler):
    s = make_scheduler()
    list(s.submit(job(["Hello world.", "Second sentence."], stream=False)).results())
    assert sample(s, "voxbox_audio_seconds_total") > 0.5
    assert sample(s, "voxbox_time_to_first_audio_seconds_count", {"endpoint": "tts"}) == 1
    assert 0 < sample(s, "voxbox_real_time_factor_sum") < 1


def test_a_fault_outside_a_batch_step_fails_the_model_visibly_and_nothing_waits(monkeypatch):
    """A bug in the batch loop's own bookkeeping (here: the speed change) must not leave a dead thread
    behind a model that still says ready: its jobs fail at once, waiting ones too, and the phase is failed
    (so /healthz answers 503 and the orchestrator restarts the worker). The serial loop fails only the
    job whose synthesis raised (Scheduler._execute)."""
    from service import scheduler as scheduler_module
    from service.scheduler import Phase
    from tests.support.slow_engine import SlowEngine

    def broken_stretch(audio, speed):
        raise RuntimeError("stretch bug")

    monkeypatch.setattr(scheduler_module, "time_stretch", broken_stretch)
    s = Scheduler(SlowEngine(0.02, 3), Metrics().for_model("test"), queue_size=4, retry_after_s=1, warmup=False,
                  max_batch="2", batch_cap=2)
    s.start()
    try:
        assert s.loaded.wait(10) and s.ready
        slow = Job(sentences=["One.", "Two."], preset="default", prompt=None, params=SynthesisParams(speed=2.0),
                   stream=True, timeout_s=30)
        s.submit(slow)
        behind = s.submit(job(["Waiting behind it."], timeout=30))
        t0 = time.monotonic()
        for j in (slow, behind):
            with pytest.raises(Exception):
                list(j.results())
        assert time.monotonic() - t0 < 5  # failed at once, not at the 30 s deadline
        assert s.phase is Phase.FAILED and "stretch bug" in s.error
        with pytest.raises(NotReady):
            s.submit(job(["After it."]))
    finally:
        s.stop()
