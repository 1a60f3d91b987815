"""SSML and the lexicon end to end on the embedded engine (real gunicorn, real Piper speech): a
<break time="1s"/> is about a second of silence between the words around it, in a file and in a stream,
and a lexicon entry changes what is said (heard by Whisper tiny.en, tests/support/asr.py)."""
import base64
import io

import numpy as np
import pytest
import requests
import soundfile as sf

from .support.asr import transcribe, words
from .support.worker import start_worker

FIRST, SECOND = "The first part ends here.", "And the second part begins now."


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ssml-embedded")
    lexicon = tmp / "lexicon.tsv"
    lexicon.write_text("# made-up word -> what to say\nzorblax\tbanana\n")
    with start_worker(tmp, {"LEXICON_FILE": str(lexicon)}) as w:
        yield w


def silences(audio: np.ndarray, rate: int, min_s: float = 0.3) -> list[tuple[float, float]]:
    """(start, length) in seconds of each stretch of at least min_s whose 10 ms frames are all near silent."""
    frame = rate // 100
    rms = np.sqrt(np.mean(audio[: audio.size // frame * frame].reshape(-1, frame) ** 2, axis=1))
    quiet = np.append(rms < 1e-3, False)
    out, start = [], None
    for i, q in enumerate(quiet):
        if q and start is None:
            start = i
        elif not q and start is not None:
            if (i - start) / 100 >= min_s:
                out.append((start / 100, (i - start) / 100))
            start = None
    return out


def check_break(audio: np.ndarray, rate: int) -> None:
    (start, length), = silences(audio, rate)  # one long silence: the break (Piper's own pauses are shorter)
    # The break's second plus the quiet ends of the words on either side, never less than the second.
    assert 1.0 <= length <= 1.35, length
    before, after = words(transcribe(audio[: int(start * rate)], rate)), words(transcribe(
        audio[int((start + length) * rate):], rate))
    assert {"first", "part"} <= set(before) and "second" not in before, before
    assert {"second", "part"} <= set(after) and "first" not in after, after


def test_a_break_is_a_second_of_silence_between_its_words(worker):
    r = requests.post(f"{worker.url}/tts", json={"text": f'<speak>{FIRST}<break time="1s"/>{SECOND}</speak>'},
                      timeout=120)
    assert r.status_code == 200, r.text
    audio, rate = sf.read(io.BytesIO(base64.b64decode(r.json()["audio_base64"])), dtype="float32")
    check_break(audio, rate)
    # The same words as plain text: no such silence.
    plain = requests.post(f"{worker.url}/tts", json={"text": f"{FIRST} {SECOND}"}, timeout=120)
    audio, rate = sf.read(io.BytesIO(base64.b64decode(plain.json()["audio_base64"])), dtype="float32")
    assert silences(audio, rate) == []


def test_a_break_is_a_second_of_silence_in_a_stream(worker):
    with requests.post(f"{worker.url}/v1/audio/speech", json={
            "input": f'<speak>{FIRST}<break time="1s"/>{SECOND}</speak>', "response_format": "pcm", "stream": True,
            "sample_rate": 24000}, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        data = b"".join(r.iter_content(None))
    check_break(np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767, 24000)


@pytest.mark.parametrize("text", ["I would like a zorblax, please.",
                                  "<speak>I would like a <s>zorblax</s> please.</speak>"])
def test_a_lexicon_entry_changes_what_is_said(worker, text):
    r = requests.post(f"{worker.url}/v1/audio/speech", json={"input": text, "response_format": "wav"}, timeout=120)
    assert r.status_code == 200, r.text
    audio, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    heard = words(transcribe(audio, rate))
    assert "banana" in heard and "zorblax" not in heard, heard


@pytest.mark.parametrize("text,heard,not_heard", [
    # Digit by digit ("nine one one", which Whisper writes as words or digits); without say-as the voice
    # reads "911" as a number ("900-11" to Whisper).
    ('<speak>Call <say-as interpret-as="digits">911</say-as> now.</speak>', ("one one", "1 1", "111"), "900"),
    ('<speak>We sold <say-as interpret-as="cardinal">1,234</say-as> cars.</speak>', ("1 234", "1234"), None),
    ('<speak>Read the <sub alias="World Wide Web">WWW</sub> page.</speak>', ("world wide web",), None),
])
def test_say_as_and_sub_are_spoken_as_asked(worker, text, heard, not_heard):
    r = requests.post(f"{worker.url}/v1/audio/speech", json={"input": text, "response_format": "wav"}, timeout=120)
    assert r.status_code == 200, r.text
    audio, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    said = " ".join(words(transcribe(audio, rate)))
    assert any(h in said for h in heard) and (not_heard is None or not_heard not in said), said
