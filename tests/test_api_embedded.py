"""The worker over real HTTP (gunicorn), on the embedded engine: every endpoint, bad input, recovery."""
import base64
import io
import json
import socket
import time

import numpy as np
import pytest
import requests
import soundfile as sf

from .support.worker import start_worker

SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with start_worker(tmp_path_factory.mktemp("worker"), {"MAX_TEXT_CHARS": "2000", "QUEUE_SIZE": "4"}) as w:
        yield w


def decode_wav(data: bytes):
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    return audio, rate


def assert_speech(audio: np.ndarray, rate: int, min_seconds: float = 0.5):
    assert audio.ndim == 1 and audio.size / rate >= min_seconds
    assert np.isfinite(audio).all()
    assert float(np.sqrt(np.mean(audio ** 2))) > 0.01  # not silence


def test_healthz_readyz_info(worker):
    assert requests.get(f"{worker.url}/healthz").json() == {"status": "ok"}
    ready = requests.get(f"{worker.url}/readyz")
    assert ready.status_code == 200 and ready.json()["phase"] == "ready"
    info = requests.get(f"{worker.url}/info").json()
    assert info["engine"]["name"] == "embedded" and info["limits"]["max_text_chars"] == 2000
    # Where start-up time went: the same numbers on both, the warm-up really ran.
    startup = ready.json()["startup"]
    assert info["startup"] == startup and startup["started_at"] <= time.time()
    assert all(startup[k] >= 0 for k in ("load_s", "warmup_s", "batch_alloc_s")) and startup["warmup_s"] > 0
    gauges = {line.split()[0]: float(line.split()[1]) for line in requests.get(f"{worker.url}/metrics").text
              .splitlines() if line.startswith("voxbox_startup_seconds{")}
    assert gauges['voxbox_startup_seconds{model="embedded",phase="load"}'] == pytest.approx(startup["load_s"],
                                                                                          abs=1e-3)
    assert set(gauges) == {f'voxbox_startup_seconds{{model="embedded",phase="{p}"}}'
                           for p in ("load", "warmup", "batch_alloc")}


def test_tts_seed_contract(worker):
    r = requests.post(f"{worker.url}/tts", json={"text": SENTENCE})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"audio_base64", "duration", "latency", "sample_rate"}
    audio, rate = decode_wav(base64.b64decode(body["audio_base64"]))
    assert rate == body["sample_rate"] == 44100
    assert abs(audio.size / rate - body["duration"]) < 0.01
    assert 0 < body["latency"] < 30
    assert_speech(audio, rate)
    assert r.headers["X-Request-ID"]


@pytest.mark.parametrize("rate", [16000, 22050, 48000])
def test_tts_resamples(worker, rate):
    body = requests.post(f"{worker.url}/tts", json={"text": "Hello there.", "sample_rate": rate}).json()
    audio, got = decode_wav(base64.b64decode(body["audio_base64"]))
    assert got == rate == body["sample_rate"]
    assert_speech(audio, got, 0.3)


def test_tts_styles_are_voice_presets(worker):
    calm = requests.post(f"{worker.url}/tts", json={"text": SENTENCE, "style": "joe-calm"}).json()
    lively = requests.post(f"{worker.url}/tts", json={"text": SENTENCE, "style": "joe-lively"}).json()
    assert calm["duration"] > lively["duration"]  # calm speaks slower


@pytest.mark.parametrize("fmt,ctype", [("wav", "audio/wav"), ("flac", "audio/flac"), ("mp3", "audio/mpeg"),
                                       ("opus", "audio/ogg; codecs=opus")])
def test_openai_speech_formats(worker, fmt, ctype):
    r = requests.post(f"{worker.url}/v1/audio/speech",
                      json={"model": "tts-1", "input": SENTENCE, "voice": "alloy", "response_format": fmt})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == ctype
    audio, rate = decode_wav(r.content)
    assert rate == (48000 if fmt == "opus" else 44100)
    assert r.headers["X-Sample-Rate"] == str(rate)  # the rate actually encoded (Opus goes up to 48 kHz)
    assert_speech(audio, rate)


@pytest.mark.parametrize("rate", [16000, 44100])
def test_openai_speech_aac_whole_and_streamed(worker, rate):
    """AAC (ADTS), one of OpenAI's six formats: whole, streamed and as SSE, each decoding to the same speech."""
    from .test_audio_encode import decode_aac

    body = {"input": SENTENCE, "response_format": "aac", "sample_rate": rate}
    whole = requests.post(f"{worker.url}/v1/audio/speech", json=body)
    assert whole.status_code == 200 and whole.headers["Content-Type"] == "audio/aac", whole.text
    assert whole.headers["X-Sample-Rate"] == str(rate)
    audio, got = decode_aac(whole.content)
    assert got == rate
    assert_speech(audio, rate)
    seconds = float(whole.headers["X-Audio-Duration"])
    assert seconds <= audio.size / rate <= seconds + 3 * 1024 / rate  # the codec's priming and last frame
    with requests.post(f"{worker.url}/v1/audio/speech", json={**body, "stream": True}, stream=True) as r:
        assert r.status_code == 200 and r.headers["Content-Type"] == "audio/aac"
        streamed = b"".join(r.iter_content(chunk_size=None))
    s_audio, _ = decode_aac(streamed)
    # The same speech (a stream's first chunk is shorter, so its pauses may differ a little).
    assert abs(s_audio.size - audio.size) / rate < 0.3
    assert_speech(s_audio, rate)
    with requests.post(f"{worker.url}/v1/audio/speech", json={**body, "stream_format": "sse"}, stream=True) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    sse_audio, _ = decode_aac(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]))
    assert abs(sse_audio.size - audio.size) / rate < 0.3
    assert_speech(sse_audio, rate)


def test_openai_speech_pcm_and_speed(worker):
    slow = requests.post(f"{worker.url}/v1/audio/speech",
                         json={"input": SENTENCE, "response_format": "pcm", "speed": 0.5})
    fast = requests.post(f"{worker.url}/v1/audio/speech",
                         json={"input": SENTENCE, "response_format": "pcm", "speed": 2.0})
    assert slow.headers["X-Sample-Rate"] == "44100" and slow.headers["Content-Type"] == "audio/L16"
    n_slow, n_fast = len(slow.content) // 2, len(fast.content) // 2
    assert 2.5 < n_slow / n_fast < 6


def test_openai_speech_streams_in_chunks(worker):
    text = " ".join(f"This is sentence number {i} of a streamed answer." for i in range(8))
    with requests.post(f"{worker.url}/v1/audio/speech", stream=True,
                       json={"input": text, "response_format": "pcm", "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["Transfer-Encoding"] == "chunked" and r.headers["X-Sample-Rate"] == "44100"
        arrivals, data = [], b""
        for chunk in r.iter_content(chunk_size=None):
            arrivals.append(time.monotonic())
            data += chunk
    assert len(arrivals) >= 3
    assert arrivals[-1] - arrivals[0] > 0.05  # spread over time, not one buffered blob
    audio = np.frombuffer(data, "<i2").astype(np.float32) / 32767
    assert_speech(audio, 44100, 5.0)


def test_wav_stream_is_playable(worker):
    r = requests.post(f"{worker.url}/v1/audio/speech",
                      json={"input": "One. Two. Three.", "response_format": "wav", "stream": True})
    assert r.content[:4] == b"RIFF"
    pcm = np.frombuffer(r.content[44:], "<i2")
    assert pcm.size / 44100 > 0.8


def test_openai_speech_server_sent_events(worker):
    """stream_format=sse: OpenAI's speech.audio.delta events carry one audio stream, then done + usage."""
    text = " ".join(f"This is sentence number {i} of an event stream." for i in range(6))
    with requests.post(f"{worker.url}/v1/audio/speech", stream=True,
                       json={"input": text, "response_format": "pcm", "stream_format": "sse"}) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events, arrivals = [], []
        for line in r.iter_lines():
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
                arrivals.append(time.monotonic())
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "speech.audio.done" and set(kinds[:-1]) == {"speech.audio.delta"} and len(kinds) >= 3
    assert arrivals[-1] - arrivals[0] > 0.05  # sent as generated, not all at the end
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    audio = np.frombuffer(pcm, "<i2").astype(np.float32) / 32767
    assert_speech(audio, 44100, 4.0)
    usage = events[-1]["usage"]
    seconds = audio.size / 44100
    assert usage["input_tokens"] == len(text) and abs(usage["output_tokens"] - seconds * 6.25) <= 2
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_openapi_document(worker):
    doc = requests.get(f"{worker.url}/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {"/tts", "/v1/audio/speech", "/v1/voices", "/healthz", "/readyz", "/metrics"} <= set(doc["paths"])
    assert "text" in doc["components"]["schemas"]["TTSRequest"]["properties"]


def test_metrics_after_requests(worker):
    requests.post(f"{worker.url}/tts", json={"text": "Metrics."})
    text = requests.get(f"{worker.url}/metrics").text
    for name in ("voxbox_requests_total", "voxbox_queue_depth", "voxbox_in_flight",
                 "voxbox_time_to_first_audio_seconds_bucket", "voxbox_synthesis_seconds_bucket",
                 "voxbox_audio_seconds_total", "voxbox_real_time_factor_bucket"):
        assert name in text
    assert 'voxbox_requests_total{endpoint="/tts",status="200"}' in text


BAD = [
    ("empty text", {"text": ""}, 400, "invalid_text"),
    ("whitespace", {"text": "   \n\t "}, 400, "invalid_text"),
    ("control char", {"text": "hi\x00there"}, 400, "invalid_text"),
    ("wrong type", {"text": 123}, 400, "invalid_request"),
    ("unknown field", {"text": "hi", "volume": 3}, 400, "invalid_request"),
    ("bad rate", {"text": "hi", "sample_rate": 12345}, 400, "unsupported_sample_rate"),
    ("lang it does not speak", {"text": "hi", "lang": "fr"}, 400, "unsupported_language"),
    ("bad lang", {"text": "hi", "lang": 3}, 400, "invalid_request"),
    ("chinese on english engine", {"text": "你好世界"}, 400, "unsupported_language"),
    ("unknown style", {"text": "hi", "style": "nobody"}, 400, "unknown_voice"),
    ("too long", {"text": "a" * 2001}, 413, "text_too_long"),
    ("bad cfg", {"text": "hi", "cfg_value": 99}, 400, "invalid_request"),
]


@pytest.mark.parametrize("name,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_tts_input(worker, name, body, status, code):
    r = requests.post(f"{worker.url}/tts", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and len(err["message"]) > 10


def test_chinese_on_the_embedded_engine_says_how_to_get_chinese(worker):
    msg = requests.post(f"{worker.url}/tts", json={"text": "你好世界"}).json()["error"]["message"]
    assert "speaks en only" in msg and "TTS_ENGINE=voxcpm" in msg and "MODEL_URI" in msg, msg


def test_bad_rate_lists_allowed(worker):
    msg = requests.post(f"{worker.url}/tts", json={"text": "hi", "sample_rate": 1}).json()["error"]["message"]
    assert "44100" in msg and "16000" in msg


def test_too_long_names_the_limit(worker):
    msg = requests.post(f"{worker.url}/tts", json={"text": "a" * 2001}).json()["error"]["message"]
    assert "2000" in msg


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b"", b"null"])
def test_invalid_json(worker, raw):
    r = requests.post(f"{worker.url}/tts", data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_speech_bad_inputs(worker):
    cases = [({"input": "hi", "response_format": "m4a"}, "invalid_request"),
             ({"input": "hi", "speed": 10}, "invalid_request"),
             ({"input": "hi", "response_format": "flac", "stream": True}, "format_not_streamable"),
             ({"input": "hi", "response_format": "mp3", "stream_format": "sse"}, "format_not_streamable"),
             ({"input": "hi", "stream_format": "json"}, "invalid_request"),
             ({"text": "hi"}, "invalid_request")]
    for body, code in cases:
        r = requests.post(f"{worker.url}/v1/audio/speech", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (body, r.text)


def test_one_megabyte_text_then_still_serving(worker):
    r = requests.post(f"{worker.url}/tts", data=json.dumps({"text": "word " * 200_000}),
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "text_too_long"
    assert requests.post(f"{worker.url}/tts", json={"text": "Still here."}).status_code == 200


def test_unknown_route_and_method_are_json(worker):
    r = requests.get(f"{worker.url}/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = requests.get(f"{worker.url}/tts")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_request_id_is_echoed_and_logged(worker):
    r = requests.post(f"{worker.url}/tts", json={"text": "Trace me."}, headers={"X-Request-ID": "trace-abc-123"})
    assert r.headers["X-Request-ID"] == "trace-abc-123"
    time.sleep(0.2)
    assert "trace-abc-123" in worker.log_text()


def test_client_that_disconnects_mid_stream_does_not_hurt_the_worker(worker):
    long_text = " ".join(f"Sentence {i} keeps the engine busy for a little while longer." for i in range(30))
    body = json.dumps({"input": long_text, "response_format": "pcm", "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", worker.port))
    s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    s.close()
    t0 = time.monotonic()
    r = requests.post(f"{worker.url}/tts", json={"text": "After the disconnect."})
    assert r.status_code == 200
    assert time.monotonic() - t0 < 10  # the abandoned 30-sentence stream was stopped, not finished first


def test_embedded_speech_is_intelligible(worker):
    from .support.asr import transcribe, word_error_rate

    text = "Please call Stella. Ask her to bring these things with her from the store."
    body = requests.post(f"{worker.url}/tts", json={"text": text, "sample_rate": 16000}).json()
    audio, rate = decode_wav(base64.b64decode(body["audio_base64"]))
    heard = transcribe(audio, rate)
    assert word_error_rate(text, heard) <= 0.25, heard


def test_a_short_text_streams_its_first_audio_early(worker):
    """Two sentences (150 characters) streamed: the first audio comes from a short first chunk (the
    greeting), long before the end, instead of all at once after the whole text."""
    text = ("Hello! This is VoxBox, a text to speech service running on your own machine, "
            "and it starts speaking right away.")
    t0 = time.perf_counter()
    arrivals = []
    with requests.post(f"{worker.url}/v1/audio/speech", json={"input": text, "response_format": "pcm",
                                                              "stream": True}, stream=True, timeout=60) as r:
        assert r.status_code == 200
        for chunk in r.iter_content(chunk_size=None):
            if chunk:
                arrivals.append(time.perf_counter() - t0)
    first, last = arrivals[0], arrivals[-1]
    assert first < 0.5 * last, (first, last)
    # Not streamed: one chunk as before (the short first chunk is for streams only).
    body = requests.post(f"{worker.url}/tts", json={"text": text}).json()
    assert body["duration"] > 3


def test_instructions_are_taken_everywhere_and_said_ignored(worker):
    """OpenAI's `instructions`: accepted on every endpoint; the embedded engine cannot apply them, and says so."""
    models = requests.get(f"{worker.url}/v1/models").json()["data"]
    assert [m["supports_instructions"] for m in models] == [False]
    cheerful = "Speak in a cheerful tone."
    tts = requests.post(f"{worker.url}/tts", json={"text": "Hello there.", "instructions": cheerful})
    assert tts.status_code == 200 and tts.headers["X-Instructions-Ignored"] == "true"
    assert_speech(*decode_wav(base64.b64decode(tts.json()["audio_base64"])), 0.3)
    for extra in ({}, {"stream": True}, {"stream_format": "sse"}):
        r = requests.post(f"{worker.url}/v1/audio/speech", json={"input": "Hello there.", "instructions": cheerful,
                                                                 "response_format": "wav", **extra})
        assert r.status_code == 200 and r.headers["X-Instructions-Ignored"] == "true", (extra, r.text)
    # No instructions (or only blanks): nothing was ignored, no header.
    for body in ({"text": "Hello there."}, {"text": "Hello there.", "instructions": "  "}):
        assert "X-Instructions-Ignored" not in requests.post(f"{worker.url}/tts", json=body).headers
    r = requests.post(f"{worker.url}/tts", json={"text": "Hello.", "instructions": "x" * 1001})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    assert "instructions" in r.json()["error"]["message"] and "1000" in r.json()["error"]["message"]


def test_openai_sdk_with_instructions(worker):
    """The current OpenAI SDK's call, as its documentation writes it (mp3, gpt-4o-mini-tts, instructions)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{worker.url}/v1", api_key="unused-by-the-bare-worker", max_retries=0)
    resp = client.audio.speech.with_raw_response.create(model="gpt-4o-mini-tts", voice="alloy", input=SENTENCE,
                                                        instructions="Speak in a cheerful tone.")
    assert resp.http_response.status_code == 200
    assert resp.headers["content-type"] == "audio/mpeg" and resp.headers["x-instructions-ignored"] == "true"
    assert_speech(*decode_wav(resp.parse().content))  # what create() itself returns


# Three sentences of over 100 characters: no two fit one 200-character chunk, so three captions.
CAPTIONED = ["The morning train to the city was late again, so most of the people on the platform waited "
             "in the cold rain.",
             "Inside the small bakery near the station, the owner was already selling fresh bread and hot "
             "coffee to everyone.",
             "By noon the sun came out, the streets dried quickly, and the children in the park started "
             "playing football."]


def assert_captions_tile(captions: list[dict], seconds: float, rate: int):
    """From 0 to the end of the audio, each caption starting where the one before ends."""
    assert captions[0]["start"] == 0
    for before, after in zip(captions, captions[1:]):
        assert before["start"] < before["end"] == after["start"]
    assert abs(captions[-1]["end"] - seconds) <= max(1024 / rate, 0.002), (captions[-1], seconds)


def test_tts_captions_match_the_audio(worker):
    """timestamps: sentence: each chunk's caption, cut out of the audio at its times, says that chunk."""
    from .support.asr import transcribe, word_error_rate

    body = requests.post(f"{worker.url}/tts", json={"text": " ".join(CAPTIONED), "timestamps": "sentence",
                                                    "sample_rate": 16000}).json()
    captions = body["captions"]
    assert [c["text"] for c in captions] == CAPTIONED
    audio, rate = decode_wav(base64.b64decode(body["audio_base64"]))
    assert_captions_tile(captions, audio.size / rate, rate)
    assert abs(captions[-1]["end"] - body["duration"]) <= 0.002
    for c in captions:
        heard = transcribe(audio[int(c["start"] * rate):int(c["end"] * rate)], rate)
        assert word_error_rate(c["text"], heard) <= 0.25, (c, heard)
    assert "captions" not in requests.post(f"{worker.url}/tts", json={"text": "No captions."}).json()


def test_speech_sse_done_carries_captions(worker):
    text = " ".join(CAPTIONED)
    with requests.post(f"{worker.url}/v1/audio/speech", stream=True,
                       json={"input": text, "response_format": "pcm", "stream_format": "sse",
                             "timestamps": "sentence", "sample_rate": 24000}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: ")]
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert_captions_tile(done["captions"], len(pcm) / 2 / 24000, 24000)
    # A stream starts with a short chunk (the first clause), so there may be one caption more.
    assert " ".join(c["text"] for c in done["captions"]) == text and len(done["captions"]) >= 3
    # Captions need somewhere to go: an audio body has none.
    r = requests.post(f"{worker.url}/v1/audio/speech", json={"input": "Hi.", "timestamps": "sentence"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "timestamps_need_sse"
    r = requests.post(f"{worker.url}/tts", json={"text": "Hi.", "timestamps": "word"})
    assert r.status_code == 400 and "timestamps" in r.json()["error"]["message"]
