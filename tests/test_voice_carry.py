"""Voice carry (VOICE_CARRY): each chunk of a long text continues from the previous chunk's tail.

The real scheduler, serial and batched, with a fake engine that records what each generation was given
(tests/support/recording_engine.py); the trimming (service/carry.py) on audio whose pauses are known.
The real VoxCPM-1.5 model's side: tests/test_voxcpm_carry.py.
"""
import threading
import time

import numpy as np
import pytest

from service.carry import continuation
from service.engines import SynthesisParams, VoicePrompt
from service.metrics import Metrics
from service.scheduler import Job, Scheduler
from service.settings import Settings

from .support.jobs import sentence_audio
from .support.recording_engine import RATE, RecordingEngine, speech

SENTENCES = ["The first chunk says quite a few words, more than the bound holds.",
             "Then a second chunk, long enough to be trimmed as well.",
             "And a short third."]
BOUND_S = 1.0


@pytest.fixture
def make_scheduler():
    made = []

    def make(engine, mode="serial", carry_s=BOUND_S):
        s = Scheduler(engine, Metrics().for_model("test"), queue_size=4, retry_after_s=1, warmup=False,
                      max_batch="1" if mode == "serial" else "2", batch_cap=2, carry_s=carry_s)
        s.start()
        assert s.loaded.wait(10) and s.ready
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def run(s, sentences=SENTENCES, prompt=None, speed=1.0, stream=True):
    """The job's audio, one array per sentence."""
    return sentence_audio(s.submit(Job(sentences=sentences, preset="default", prompt=prompt,
                                       params=SynthesisParams(speed=speed), stream=stream, timeout_s=30)))


def word_audio(text: str) -> tuple[np.ndarray, list[int]]:
    """Audio for `text` at an even pace (50 ms a character): noise for letters, silence for spaces; and
    where each word's audio starts."""
    per_char = RATE // 20
    rng = np.random.default_rng(0)
    audio = np.concatenate([np.zeros(per_char, np.float32) if ch == " " else
                            (0.3 * rng.standard_normal(per_char)).astype(np.float32) for ch in text])
    starts = [i * per_char for i, ch in enumerate(text) if ch != " " and (i == 0 or text[i - 1] == " ")]
    return audio, starts


def test_the_tail_is_cut_in_a_pause_and_says_the_words_it_holds():
    text = "one two three four five six seven eight nine ten eleven twelve"
    audio, starts = word_audio(text)
    c = continuation(audio, text, RATE, 1.0)
    cut = audio.size - c.audio.size
    assert 0 < c.audio.size <= RATE and np.array_equal(c.audio, audio[cut:])
    # The cut falls in the silence before a word, and the text names exactly the words after it.
    word = min(range(len(starts)), key=lambda i: abs(starts[i] - cut))
    assert starts[word] - RATE // 20 <= cut <= starts[word]
    assert c.text == " ".join(text.split()[word:])
    assert 0.5 * RATE < c.audio.size  # not needlessly short either


def test_a_short_chunk_is_carried_whole_and_chinese_is_cut_between_characters():
    audio = speech("Short one.")
    c = continuation(audio, " Short one. ", RATE, 5.0)
    assert np.array_equal(c.audio, audio) and c.text == "Short one."
    zh = "今天天气很好我们一起去公园散步吧"
    c = continuation(np.ones(RATE * len(zh) // 4, np.float32), zh, RATE, 1.0)  # 0.25 s a character
    assert zh.endswith(c.text) and 1 <= len(c.text) <= 4 and c.audio.size <= RATE


@pytest.mark.parametrize("mode", ["serial", "batched"])
def test_each_chunk_continues_from_the_previous_one(make_scheduler, mode):
    engine = RecordingEngine()
    s = make_scheduler(engine, mode)
    audio = run(s)
    assert [c.text for c in engine.calls] == SENTENCES
    assert all(c.batched == (mode == "batched") for c in engine.calls)
    assert engine.calls[0].carry is None
    for k in (0, 1):
        carry = engine.calls[k + 1].carry
        # Chunk k's own audio (as it was sent), its last second at most, with the words of that tail.
        assert np.array_equal(audio[k], speech(SENTENCES[k]))
        assert 0.5 * RATE < carry.audio.size <= BOUND_S * RATE
        assert np.array_equal(carry.audio, audio[k][-carry.audio.size:])
        assert SENTENCES[k].endswith(" " + carry.text) and len(carry.text) < len(SENTENCES[k]) / 2
    # The words kept match the audio kept, within a word or two at 50 ms a character.
    assert abs(len(engine.calls[1].carry.text) * RATE / 20 - engine.calls[1].carry.audio.size) < 0.5 * RATE


@pytest.mark.parametrize("mode", ["serial", "batched"])
def test_off_when_the_setting_is_off_or_the_engine_cannot_carry(make_scheduler, mode):
    assert Settings(voice_carry="off").carry_seconds == 0
    assert Settings().carry_seconds == Settings().voice_carry_max_s == 5.0
    for engine, carry_s in ((RecordingEngine(), 0.0), (RecordingEngine(carry=False), BOUND_S)):
        s = make_scheduler(engine, mode, carry_s=carry_s)
        run(s)
        assert len(engine.calls) == 3 and all(c.carry is None for c in engine.calls)


def test_a_single_chunk_carries_nothing(make_scheduler):
    engine = RecordingEngine()
    run(make_scheduler(engine), sentences=["Only one."])
    assert [c.carry for c in engine.calls] == [None]


@pytest.mark.parametrize("mode", ["serial", "batched"])
def test_a_request_voice_reaches_every_chunk(make_scheduler, mode, tmp_path):
    """The voice goes with every chunk, alongside the carry: the engine decides which conditions it
    (VoxCPM-1.5 keeps the voice; tests/test_voxcpm_carry.py)."""
    engine = RecordingEngine()
    voice = VoicePrompt("v" * 12, tmp_path / "voice.wav", "A reference clip.")
    run(make_scheduler(engine, mode), prompt=voice)
    assert [c.prompt for c in engine.calls] == [voice] * 3
    assert [c.carry is None for c in engine.calls] == [True, False, False]


@pytest.mark.parametrize("mode", ["serial", "batched"])
@pytest.mark.parametrize("stream", [True, False])
def test_the_carry_holds_speed_one_audio_and_the_scheduler_stretches(make_scheduler, mode, stream):
    """A prompt at the model's own pace: a stretched one would be copied by the next chunk and the
    stretch applied again on top, faster with every chunk."""
    engine = RecordingEngine()
    s = make_scheduler(engine, mode)
    audio = run(s, speed=1.5, stream=stream)
    if mode == "serial":  # (the batch loop stretches every batched request itself; see BatchLoop._audio)
        assert all(c.params.speed == 1.0 for c in engine.calls)
    raw = speech(SENTENCES[0])
    assert np.array_equal(engine.calls[1].carry.audio, raw[-engine.calls[1].carry.audio.size:])
    assert abs(audio[0].size - raw.size / 1.5) < 0.02 * raw.size


@pytest.mark.parametrize("mode", ["serial", "batched"])
def test_a_stream_gets_the_first_chunk_before_the_second_is_generated(make_scheduler, mode):
    engine = RecordingEngine()
    second_may_start = threading.Event()
    engine.before = lambda text: second_may_start.wait(10) if text == SENTENCES[1] else None
    s = make_scheduler(engine, mode)
    job = s.submit(Job(sentences=SENTENCES[:2], preset="default", prompt=None, params=SynthesisParams(),
                       stream=True, timeout_s=30))
    first = []
    t0 = time.monotonic()
    for event in job.results():
        first.append(event.audio)
        if event.sentence_ends:
            break
    # All of chunk 1 arrived while chunk 2's generation was still held back (it waits up to 10 s).
    assert time.monotonic() - t0 < 5 and not second_may_start.is_set()
    assert np.array_equal(np.concatenate(first), speech(SENTENCES[0]))
    second_may_start.set()
    assert sum(e.audio.size for e in job.results()) == speech(SENTENCES[1]).size
    assert engine.calls[1].carry is not None


@pytest.mark.parametrize("setting", ["on", "off"])
def test_the_setting_reaches_a_request_through_the_service(setting):
    """VOICE_CARRY and VOICE_CARRY_MAX_S, as the worker builds its models, on a request's whole path
    (text split into chunks, queued, generated)."""
    from service.models import build_models

    settings = Settings(voice_carry=setting, voice_carry_max_s=2.0, max_chunk_chars=80, warmup=False)
    engine = RecordingEngine()
    [model] = list(build_models(settings, Metrics(), voices=None, engine=engine))
    model.scheduler.start()
    try:
        assert model.scheduler.loaded.wait(10) and model.scheduler.ready
        prep = model.synthesis.start(" ".join(SENTENCES), "en", "default", SynthesisParams(), None, stream=False,
                                     endpoint="tts")
        model.synthesis.collect(prep, lambda: False)
    finally:
        model.scheduler.stop()
    assert len(engine.calls) >= 2 and engine.calls[0].carry is None
    carries = [c.carry for c in engine.calls[1:]]
    if setting == "off":
        assert carries == [None] * len(carries)
    else:
        assert all(1.0 * RATE < c.audio.size <= 2.0 * RATE for c in carries)
