import io
import json

import numpy as np
import pytest
import soundfile as sf

from service.audio import Stitcher, resample, time_stretch
from service.encode import FORMATS, STREAMABLE, StreamEncoder, encode


def tone(freq=440.0, rate=22050, seconds=1.0):
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_freq(x, rate):
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return np.fft.rfftfreq(x.size, 1 / rate)[spec.argmax()]


@pytest.mark.parametrize("src,dst", [(22050, 44100), (44100, 16000), (44100, 48000), (22050, 22050)])
def test_resample_keeps_duration_and_pitch(src, dst):
    out = resample(tone(rate=src), src, dst)
    assert abs(out.size - dst) <= 2
    assert abs(dominant_freq(out, dst) - 440.0) < 3


def test_time_stretch_changes_duration_not_pitch():
    out = time_stretch(tone(rate=22050, seconds=2.0), 2.0)
    assert abs(out.size - 22050) < 600
    assert abs(dominant_freq(out, 22050) - 440.0) < 10


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus"])
@pytest.mark.parametrize("rate", [16000, 44100])
def test_encode_decodes_back(fmt, rate):
    data = encode(tone(rate=rate), rate, fmt)
    audio, got_rate = sf.read(io.BytesIO(data), dtype="float32")
    expected_rate = 48000 if fmt == "opus" and rate == 44100 else rate
    assert got_rate == expected_rate
    assert abs(audio.size / got_rate - 1.0) < 0.1
    assert abs(dominant_freq(audio, got_rate) - 440.0) < 5


def test_pcm_is_raw_s16le():
    data = encode(np.array([0.0, 0.5, -1.0, 2.0], dtype=np.float32), 16000, "pcm")
    assert np.frombuffer(data, "<i2").tolist() == [0, 16383, -32767, 32767]


@pytest.mark.parametrize("fmt", STREAMABLE)
def test_stream_encoder_output_is_one_valid_stream(fmt):
    enc = StreamEncoder(fmt, 22050, 44100)
    source = tone(rate=22050, seconds=1.5)
    parts = [enc.header()]
    for piece in np.array_split(source, 9):  # chunks of ~160 ms, like VoxCPM's streaming
        parts.append(enc.push(piece))
    parts.append(enc.close())
    data = b"".join(parts)
    if fmt == "pcm":
        audio, rate = np.frombuffer(data, "<i2").astype(np.float32) / 32767, 44100
    else:
        if fmt == "wav":  # a streamed WAV has unknown (max) sizes; libsndfile reads it as far as data goes
            data = data[:4] + (len(data) - 8).to_bytes(4, "little") + data[8:40] + \
                (len(data) - 44).to_bytes(4, "little") + data[44:]
        audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == enc.rate
    assert abs(audio.size / rate - 1.5) < 0.1
    assert abs(dominant_freq(audio, rate) - 440.0) < 5
    if fmt in ("pcm", "wav"):  # a stateful resampler leaves no clicks at chunk edges
        assert np.abs(np.diff(audio[rate // 10: -rate // 10])).max() < 0.1


@pytest.mark.parametrize("fmt", ["flac", "mp3"])
def test_formats_that_rewrite_headers_are_not_streamable(fmt):
    with pytest.raises(ValueError, match="cannot be streamed"):
        StreamEncoder(fmt, 22050, 22050)
    assert set(FORMATS) == {"wav", "flac", "mp3", "opus", "pcm"}


def test_stitcher_crossfades_sentences_and_loses_nothing_else():
    rate, fade_ms = 1000, 10
    st = Stitcher(rate, fade_ms)
    a, b = np.ones(100, np.float32), np.ones(50, np.float32) * 0.5
    out = [st.push(a[:60], False), st.push(a[60:], True), st.push(b, True), st.flush()]
    joined = np.concatenate(out)
    assert joined.size == 100 + 50 - 10  # one crossfade of 10 samples at the single boundary
    assert np.allclose(joined[:90], 1.0) and np.allclose(joined[-40:], 0.5)
    fade = joined[90:100]
    assert fade.max() <= 1.2 and fade.min() >= 0.499  # equal-power blend, no gap, no spike


def test_stitcher_without_crossfade_is_plain_concatenation():
    st = Stitcher(1000, 0)
    parts = [st.push(np.arange(5, dtype=np.float32), True), st.push(np.arange(3, dtype=np.float32), True),
             st.flush()]
    assert np.concatenate(parts).tolist() == [0, 1, 2, 3, 4, 0, 1, 2]


def test_speech_events_end_with_an_error_event_when_synthesis_fails_mid_stream():
    """After the first event the status is sent; a later failure must still reach the client."""
    from service.api.errors import ApiError
    from service.api.tts import _events

    encoder = StreamEncoder("pcm", 44100, 44100)

    def chunks():
        yield encoder.push(np.zeros(4410, np.float32))
        raise ApiError(504, "deadline_exceeded", "the request took longer than 30 s")

    events = [json.loads(e.removeprefix("data: ")) for e in _events(chunks(), encoder, 5, 6.25)]
    assert [e["type"] for e in events] == ["speech.audio.delta", "error"]
    assert events[1]["error"] == {"code": "deadline_exceeded", "message": "the request took longer than 30 s"}
    assert encoder.seconds == 0.1
