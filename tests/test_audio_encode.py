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


def decode_aac(data: bytes) -> tuple[np.ndarray, int]:
    """ADTS bytes decoded by FFmpeg (PyAV), independently of how they were written."""
    import av

    with av.open(io.BytesIO(data), format="adts") as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name == "aac"
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
        return audio.astype(np.float32), stream.rate


def sweep(rate: int, seconds: float = 1.0) -> np.ndarray:
    """A rising tone under a syllable-like envelope: speech-band content whose alignment is unambiguous."""
    t = np.arange(int(rate * seconds)) / rate
    top = min(3000.0, rate / 2 * 0.8)
    phase = 2 * np.pi * (150 * t + (top - 150) / (2 * seconds) * t ** 2)
    return (0.5 * np.sin(phase) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def assert_same_audio(decoded: np.ndarray, source: np.ndarray, rate: int):
    """Same length up to the codec's priming and last-frame padding, same level, same waveform once aligned."""
    frame = 1024  # AAC's frame; the encoder primes with one, and pads the last to a whole one
    assert source.size <= decoded.size <= source.size + 3 * frame, (decoded.size, source.size)
    scores = [np.corrcoef(decoded[lag:lag + source.size], source)[0, 1] for lag in range(decoded.size - source.size + 1)]
    lag = int(np.argmax(scores))
    aligned = decoded[lag:lag + source.size]
    assert scores[lag] > 0.95, (lag, scores[lag])
    rms = lambda x: float(np.sqrt(np.mean(x ** 2)))  # noqa: E731
    assert abs(rms(aligned) / rms(source) - 1) < 0.1


# Every rate the service offers (Settings.allowed_sample_rates): AAC carries them all as they are.
@pytest.mark.parametrize("rate", [8000, 16000, 22050, 24000, 32000, 44100, 48000])
def test_aac_decodes_back_at_every_offered_rate(rate):
    from service.settings import Settings

    assert rate in Settings().sample_rates
    source = sweep(rate)
    decoded, got_rate = decode_aac(encode(source, rate, "aac"))
    assert got_rate == rate
    assert_same_audio(decoded, source, rate)


def test_aac_streams_as_adts_frames_that_decode_as_one():
    """Streamed AAC leaves in pieces as it is encoded (not all at close), and the pieces are one stream."""
    enc = StreamEncoder("aac", 22050, 44100)
    source = sweep(22050, 1.5)
    parts = [enc.header()] + [enc.push(piece) for piece in np.array_split(source, 9)]
    assert parts[0] == b"" and sum(1 for p in parts[1:] if p) >= 7  # bytes out with (nearly) every push
    assert all(p[:2] in (b"", b"\xff\xf1") for p in parts)  # each piece starts on an ADTS frame (sync word)
    data = b"".join(parts) + enc.close()
    decoded, rate = decode_aac(data)
    assert rate == enc.rate == 44100 and abs(enc.seconds - 1.5) < 1e-9
    assert_same_audio(decoded, resample(source, 22050, 44100), rate)


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
    elif fmt == "aac":
        audio, rate = decode_aac(data)
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
    assert set(FORMATS) == {"wav", "flac", "mp3", "opus", "pcm", "aac"}


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


def test_stitcher_places_sentence_ends_mid_crossfade():
    """Captions: a sentence ends in the middle of its crossfade into the next, the last at the very end."""
    st = Stitcher(1000, 10)
    out = [st.push(np.ones(100, np.float32), True), st.push(np.ones(50, np.float32), True),
           st.push(np.zeros(0, np.float32), True),  # a chunk that made no audio: it lasts no time
           st.push(np.ones(80, np.float32), True), st.flush()]
    total = sum(o.size for o in out)
    assert total == 100 + 50 + 80 - 2 * 10
    assert st.ends == [95.0, 135.0, 135.0, total]  # 100 - 10 + 5; then 90 + 50 - 10 + 5


def test_stitcher_places_streamed_sentence_ends_where_the_next_begins():
    """A streamed sentence arrives in pieces and ends with an empty push: no crossfade, ends exactly between."""
    st = Stitcher(1000, 10)
    sizes = [[30, 40], [25], [10, 10, 10]]
    joined = []
    for pieces in sizes:
        for n in pieces:
            joined.append(st.push(np.ones(n, np.float32), False))
        joined.append(st.push(np.zeros(0, np.float32), True))
    joined.append(st.flush())
    assert sum(o.size for o in joined) == 125 and st.ends == [70, 95, 125]


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
