"""Bad input over real HTTP and WebSocket (gunicorn): every refusal is a clear 4xx JSON error, never a 500,
an empty 200, a hung worker or a worker killed by memory. Mostly the embedded engine; one VoxCPM case."""
import io
import json
import re
import socket
import time
from contextlib import ExitStack

import numpy as np
import pytest
import requests
import soundfile as sf
import websocket

from .support.procs import parse_response, read_response
from .support.voxcpm_checkpoint import build_checkpoint
from .support.worker import SLOW_APP, start_worker, ws_collect

VOICE_MAX_BYTES = 1_500_000
THREADS = 16  # GUNICORN_THREADS the worker gets from start_worker
BODY_READ_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    env = {"MAX_TEXT_CHARS": "2000", "VOICE_MAX_BYTES": str(VOICE_MAX_BYTES), "GUNICORN_THREADS": str(THREADS),
           "BODY_READ_TIMEOUT_S": str(BODY_READ_TIMEOUT_S)}
    with start_worker(tmp_path_factory.mktemp("bad-input"), env) as w:
        yield w


@pytest.fixture(scope="module")
def cloning_worker(tmp_path_factory):
    """Uploads are checked by the voice store whatever the engine, but only a cloning engine accepts them
    (the embedded one refuses every upload): a timed fake with SLOW_CLONING=1."""
    env = {"VOICE_MAX_BYTES": str(VOICE_MAX_BYTES), "SLOW_CLONING": "1"}
    with start_worker(tmp_path_factory.mktemp("bad-uploads"), env, app=SLOW_APP) as w:
        yield w


def clip(seconds=3.0, rate=22050, channels=1, subtype=None, amplitude=0.3):
    t = np.arange(int(rate * seconds)) / rate
    audio = (amplitude * np.sin(2 * np.pi * 160 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)
    if channels > 1:
        audio = np.stack([audio] * channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def upload(worker, data, name="Probe", text="This is what the clip says."):
    return requests.post(f"{worker.url}/v1/voices", files={"file": ("ref.wav", data, "audio/wav")},
                         data={"name": name, "text": text}, timeout=60)


def assert_client_error(r, status, code=None):
    """A JSON error (4xx, or 503 for capacity) with a code and a message long enough to say what to fix."""
    assert r.status_code == status, (r.status_code, r.headers.get("Content-Type"), r.text[:300])
    assert r.headers["Content-Type"].startswith("application/json"), r.text[:300]
    err = r.json()["error"]
    if code is not None:
        assert err["code"] == code, err
    assert len(err["message"]) > 10, err
    return err


def log_mark(worker) -> int:
    return len(worker.log_text())


def assert_no_traceback_since(worker, mark: int):
    time.sleep(0.2)
    new = worker.log_text()[mark:]
    assert "Traceback" not in new, new[-3000:]


def healthy(worker):
    assert requests.get(f"{worker.url}/healthz", timeout=10).json() == {"status": "ok"}


def ws_connect(worker, timeout=30):
    return websocket.create_connection(worker.ws_url, timeout=timeout)


def raw_http(worker, request: bytes, wait: float = 10) -> tuple[int, dict, bytes]:
    """Send bytes on a fresh socket, read one response: (status, headers lower-cased, body)."""
    with socket.create_connection(("127.0.0.1", worker.port), timeout=wait) as s:
        s.sendall(request)
        return parse_response(read_response(s))


DEEP = "[" * 5000 + "]" * 5000  # 10 kB: json.loads raises RecursionError, not ValueError


# ---------------------------------------------------------------------------------------------------------------
# Bugs: these fail until the product is fixed.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/tts", "/v1/audio/speech"])
@pytest.mark.parametrize("body", [DEEP, '{"text": ' + DEEP + "}"], ids=["deep-array", "deep-field"])
def test_deeply_nested_json_is_400_not_500(worker, path, body):
    mark = log_mark(worker)
    r = requests.post(f"{worker.url}{path}", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] in ("invalid_json", "invalid_request")
    assert_no_traceback_since(worker, mark)


@pytest.mark.parametrize("headers", [
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",  # no Sec-WebSocket-Key
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",  # no version
], ids=["no-key", "no-version"])
def test_malformed_websocket_handshake_is_4xx_json(worker, headers):
    mark = log_mark(worker)
    status, hdrs, body = raw_http(worker, b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n" + headers +
                                  b"Connection: close\r\n\r\n")
    assert 400 <= status < 500, (status, body)
    assert hdrs["content-type"].startswith("application/json") and json.loads(body)["error"]["message"]
    assert_no_traceback_since(worker, mark)


@pytest.mark.parametrize("request_bytes,status,code", [
    (b"GET /v1/voices/" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    (b"GET /info HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
     431, "headers_too_large"),
    (b"POST /tts HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "bad_request"),
], ids=["long-uri", "many-headers", "bad-content-length"])
def test_requests_gunicorn_refuses_get_json_too(worker, request_bytes, status, code):
    got, headers, body = raw_http(worker, request_bytes)
    assert got == status and headers["content-type"] == "application/json", (got, body[:200])
    err = json.loads(body)["error"]
    assert err["code"] == code and len(err["message"]) > 10, err


def test_plain_get_on_the_websocket_endpoint_says_to_use_a_websocket(worker):
    r = requests.get(f"{worker.url}/v1/stream")
    assert r.status_code in (400, 426), r.text
    assert "websocket" in r.json()["error"]["message"].lower(), r.text


@pytest.mark.parametrize("fmt", ["pcm", "wav", "opus"])
def test_streaming_nothing_speakable_is_400_like_the_whole_file(worker, fmt):
    whole = requests.post(f"{worker.url}/v1/audio/speech", json={"input": "\u2014", "response_format": fmt})
    assert_client_error(whole, 400, "nothing_to_say")  # already so without stream
    r = requests.post(f"{worker.url}/v1/audio/speech", json={"input": "\u2014", "response_format": fmt,
                                                            "stream": True})
    assert_client_error(r, 400, "nothing_to_say")  # not a 200 with an empty body / bare header


def test_ws_nothing_speakable_is_an_error_not_an_empty_done(worker):
    ws = ws_connect(worker)
    try:
        ws.send(json.dumps({"text": "\u2026"}))
        msg = json.loads(ws.recv())
        assert msg["type"] == "error" and msg["code"] == "nothing_to_say", msg
    finally:
        ws.close()


@pytest.mark.parametrize("text", [".", "...", "?!", "!!!???", "()"])
def test_punctuation_only_text_is_nothing_to_say(worker, text):
    # "\u2026" and "--" already answer nothing_to_say; ASCII punctuation answers 200 with a breath of noise.
    r = requests.post(f"{worker.url}/tts", json={"text": text})
    assert_client_error(r, 400, "nothing_to_say")


@pytest.mark.parametrize("path,body", [("/tts", {"text": "hi", "sample_rate": 0}),
                                       ("/v1/audio/speech", {"input": "hi", "sample_rate": 0,
                                                             "response_format": "wav"})])
def test_sample_rate_zero_is_refused_not_the_default(worker, path, body):
    err = assert_client_error(requests.post(f"{worker.url}{path}", json=body), 400, "unsupported_sample_rate")
    assert "44100" in err["message"]


def test_ws_sample_rate_zero_is_refused(worker):
    ws = ws_connect(worker)
    try:
        ws.send(json.dumps({"text": "hi", "sample_rate": 0}))
        msg = json.loads(ws.recv())
        assert msg["type"] == "error" and msg["code"] == "unsupported_sample_rate", msg
    finally:
        ws.close()


@pytest.mark.parametrize("method,path,allowed", [("GET", "/tts", "POST"), ("PUT", "/v1/voices", "POST"),
                                                 ("POST", "/healthz", "GET")])
def test_405_says_which_methods_are_allowed(worker, method, path, allowed):
    r = requests.request(method, f"{worker.url}{path}")
    err = assert_client_error(r, 405, "method_not_allowed")
    assert allowed in r.headers.get("Allow", ""), dict(r.headers)  # RFC 9110: a 405 carries Allow
    assert allowed in err["message"], err


def test_413_upload_message_names_the_limit(worker):
    r = upload(worker, b"\0" * (VOICE_MAX_BYTES + 2 * 1024 * 1024))  # past the request limit: refused unparsed
    err = assert_client_error(r, 413, "payload_too_large")
    assert re.search(r"\d", err["message"]), err  # "exceeds the capacity limit" says neither what nor how much


def test_413_json_body_message_names_the_limit(worker):
    body = json.dumps({"text": "word " * 600_000}).encode()  # 3 MB
    r = requests.post(f"{worker.url}/tts", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert re.search(r"\d", err["message"]), err


def _peak_rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_compressed_upload_that_decodes_to_hours_is_refused_without_decoding_it(cloning_worker):
    """A ~270 kB FLAC of 15 minutes of 96 kHz silence decodes to ~86 M samples (~0.7 GB as float32 in memory,
    twice). Under VOICE_MAX_BYTES (10 MB by default) the same trick makes ~3 G samples: the worker, model and
    all, is OOM-killed. The duration is in the header: check it before decoding."""
    rate = 96000
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        minute = np.zeros(rate * 60, dtype=np.int16)
        for _ in range(15):
            f.write(minute)
    data = buf.getvalue()
    assert len(data) < VOICE_MAX_BYTES
    pid = cloning_worker.worker_pid()
    with open(f"/proc/{pid}/clear_refs", "w") as fh:  # reset the peak-RSS mark
        fh.write("5")
    before = _peak_rss_kb(pid)
    r = upload(cloning_worker, data)
    err = assert_client_error(r, 400, "bad_duration")
    assert "900" in err["message"] or "15" in err["message"], err
    grew_mb = (_peak_rss_kb(pid) - before) / 1024
    assert grew_mb < 150, f"the worker's peak memory grew by {grew_mb:.0f} MB to refuse a {len(data)} byte upload"


def test_idle_websockets_do_not_starve_plain_http(worker):
    """One idle WebSocket per gunicorn thread: /healthz (and everything else) must still answer, or the
    surplus WebSockets must be refused with a JSON 503; a hung health check gets the worker restarted."""
    with ExitStack() as stack:
        for _ in range(THREADS):
            try:
                conn = websocket.create_connection(worker.ws_url, timeout=5)
            except websocket.WebSocketBadStatusException as e:  # refused: fine, if it says so
                assert e.status_code == 503, e
                continue
            stack.callback(conn.close)
        time.sleep(0.3)
        t0 = time.monotonic()
        try:
            r = requests.get(f"{worker.url}/healthz", timeout=5)
        except requests.exceptions.Timeout:
            pytest.fail(f"/healthz hung for {time.monotonic() - t0:.1f}s behind {THREADS} idle WebSockets")
        assert r.status_code == 200
    healthy(worker)


def test_websockets_beyond_the_cap_get_503_json_and_the_count_is_exported(worker):
    limit = THREADS // 8  # WS_MAX_CONNECTIONS=0: GUNICORN_THREADS / 8
    with ExitStack() as stack:
        for _ in range(limit):
            stack.callback(websocket.create_connection(worker.ws_url, timeout=5).close)
        r = requests.get(f"{worker.url}/v1/stream", headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}, timeout=5)
        err = assert_client_error(r, 503, "too_many_streams")
        assert r.headers["Retry-After"] and "WS_MAX_CONNECTIONS" in err["message"]
        metrics = requests.get(f"{worker.url}/metrics").text
        assert f"voxbox_websockets_open {float(limit)}" in metrics
    time.sleep(0.5)  # the closed sockets' threads give their slots back
    ws = ws_connect(worker)
    ws.send(json.dumps({"text": "A slot again."}))
    assert ws_collect(ws)[2]["type"] == "done"
    ws.close()


def test_clients_that_never_finish_their_body_do_not_hang_the_worker(worker):
    """Headers with Content-Length, then silence (slowloris). The gateway buffers bodies, but the worker alone
    (make run-worker, or a published port) would wait forever in every thread and stop answering: after
    BODY_READ_TIMEOUT_S of silence each stalled client gets a 408 JSON and its thread is free again."""
    socks = []
    try:
        for _ in range(THREADS):
            s = socket.create_connection(("127.0.0.1", worker.port))
            s.sendall(b"POST /tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"text\":")
            socks.append(s)
        time.sleep(0.5)
        t0 = time.monotonic()
        try:
            r = requests.get(f"{worker.url}/healthz", timeout=BODY_READ_TIMEOUT_S + 5)
        except requests.exceptions.Timeout:
            pytest.fail(f"/healthz hung behind {THREADS} clients that never finished their request body")
        assert r.status_code == 200 and time.monotonic() - t0 < BODY_READ_TIMEOUT_S + 3
        s = socks[0]
        s.settimeout(10)
        answer = read_response(s).decode("latin-1")
        assert answer.startswith("HTTP/1.1 408"), answer[:200]
        assert '"request_timeout"' in answer and "BODY_READ_TIMEOUT_S" in answer
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)
    healthy(worker)


# ---------------------------------------------------------------------------------------------------------------
# Already right: bad input that gets a proper 4xx today (not covered by the other test files).
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,code", [
    (b"[]", "invalid_json"),
    (b"null", "invalid_json"),
    (b'"hello"', "invalid_json"),
    (b'{"input": "hi"} trailing', "invalid_json"),
    (b'{"input": "hi", "speed": NaN}', "invalid_request"),
    (b'{"input": "hi", "speed": Infinity}', "invalid_request"),
    (b'{"input": "hi", "speed": "1.0"}', "invalid_request"),
    (b'{"input": "hi", "sample_rate": 1e309}', "invalid_request"),
    (b'{"input": "hi", "seed": 100000000000000000000000000000}', "invalid_request"),
    (b'{"input": "hi", "seed": -1}', "invalid_request"),
    (b'{"input": "hi", "stream": "true"}', "invalid_request"),
    (b'{"input": "hi", "response_format": "WAV"}', "invalid_request"),
    (b'{"input": "hi", "voice": null}', "invalid_request"),
    (b'{"input": {"text": "hi"}}', "invalid_request"),
    (b'{"input": "\\ud800"}', "invalid_text"),
    (b'{"input": "\\u200b\\ufeff"}', "invalid_text"),
])
def test_speech_endpoint_rejects_malformed_bodies(worker, raw, code):
    r = requests.post(f"{worker.url}/v1/audio/speech", data=raw, headers={"Content-Type": "application/json"})
    assert_client_error(r, 400, code)


@pytest.mark.parametrize("raw,says,not_says", [
    (b'{"input": "hi", "speed": "1.0"}', "speed: Input should be a number", "speed.float"),
    (b'{"input": "hi", "speed": NaN}', "finite number", "greater than"),
    (b'{"input": "hi", "seed": ' + b"9" * 5000 + b"}", "more than 4300 digits", "sys."),
    (b'{"input": "\\ud800"}', "lone surrogate U+D800", "control character"),
])
def test_error_messages_speak_json_not_python(worker, raw, says, not_says):
    err = assert_client_error(requests.post(f"{worker.url}/v1/audio/speech", data=raw,
                                            headers={"Content-Type": "application/json"}), 400)
    assert says in err["message"] and not_says not in err["message"], err


@pytest.mark.parametrize("voice,status,code", [
    *[(v, 400, "unknown_voice") for v in ("../../etc/passwd", "/etc/passwd", "v_../../x", "v_0000000000000000\u0000",
                                          "v_0000000000000000\n", "%2e%2e%2f")],
    ("v_0000000000000000", 404, "voice_not_found"),  # a well-formed id of no stored voice
])
def test_path_like_voice_names_are_unknown_voices(worker, voice, status, code):
    for path, body in (("/tts", {"text": "hi", "style": voice}),
                       ("/v1/audio/speech", {"input": "hi", "voice": voice, "response_format": "wav"})):
        err = assert_client_error(requests.post(f"{worker.url}{path}", json=body), status, code)
        assert "GET /v1/voices" in err["message"]


def test_text_exactly_at_the_limit_is_served(worker):
    text = "Limit test." + " " * 1989  # the limit counts characters as sent; padding keeps synthesis short
    assert len(text) == 2000
    r = requests.post(f"{worker.url}/v1/audio/speech", json={"input": text, "response_format": "pcm"})
    assert r.status_code == 200 and len(r.content) > 0


BROKEN_AUDIO = [
    ("one sample", clip(seconds=1 / 22050), 400, "bad_duration"),
    ("truncated wav", clip()[:len(clip()) // 2], 400, "bad_duration"),
    ("header only", clip()[:44], 400, "bad_duration"),
    ("riff garbage", b"RIFF" + b"\0" * 1000, 415, "unsupported_audio"),
    ("png", b"\x89PNG\r\n\x1a\n" + b"\0" * 500, 415, "unsupported_audio"),
]


@pytest.mark.parametrize("name,data,status,code", BROKEN_AUDIO, ids=[b[0] for b in BROKEN_AUDIO])
def test_broken_audio_uploads(cloning_worker, name, data, status, code):
    assert_client_error(upload(cloning_worker, data), status, code)


def test_nan_float_wav_is_refused_as_invalid_audio(cloning_worker):
    buf = io.BytesIO()
    sf.write(buf, np.full(22050 * 3, np.nan, dtype=np.float32), 22050, format="WAV", subtype="FLOAT")
    assert_client_error(upload(cloning_worker, buf.getvalue()), 400, "silent_audio")


def test_dc_offset_alone_is_silence_and_huge_float_samples_are_scaled(cloning_worker):
    buf = io.BytesIO()
    sf.write(buf, np.full(22050 * 3, 0.5, dtype=np.float32), 22050, format="WAV", subtype="FLOAT")
    assert_client_error(upload(cloning_worker, buf.getvalue()), 400, "silent_audio")  # a constant is no sound

    t = np.arange(22050 * 3) / 22050
    buf = io.BytesIO()
    sf.write(buf, (1e30 * np.sin(2 * np.pi * 160 * t)).astype(np.float32), 22050, format="WAV", subtype="FLOAT")
    r = upload(cloning_worker, buf.getvalue())
    assert r.status_code == 201, r.text
    stored, _ = sf.read(f"{cloning_worker.env['VOICES_DIR']}/{r.json()['id']}/audio.wav", dtype="float32")
    assert 0.9 < np.abs(stored).max() <= 1.0  # scaled into [-1, 1], the shape kept
    requests.delete(f"{cloning_worker.url}/v1/voices/{r.json()['id']}")


@pytest.mark.parametrize("rate,channels", [(8000, 2), (96000, 1), (16000, 6)])
def test_odd_rates_and_channel_counts_are_normalised(cloning_worker, rate, channels):
    r = upload(cloning_worker, clip(rate=rate, channels=channels))
    assert r.status_code == 201, r.text
    assert r.json()["sample_rate"] == 44100 and abs(r.json()["duration"] - 3.0) < 0.05
    requests.delete(f"{cloning_worker.url}/v1/voices/{r.json()['id']}")


@pytest.mark.parametrize("raw,code", [("null", "invalid_json"), ('"hello"', "invalid_json"),
                                      ('{"text": "\\ud800"}', "invalid_text"),
                                      ('{"text": "hi", "speed": NaN}', "invalid_request"),
                                      ('{"type": null, "text": "hi"}', "invalid_request"),
                                      ('{"text": "hi", "voice": "../../etc/passwd"}', "unknown_voice"),
                                      (DEEP, "invalid_json")],  # json.loads raises RecursionError
                         ids=["null", "string", "surrogate", "nan", "null-type", "path-voice", "deeply-nested"])
def test_ws_more_bad_messages_keep_the_connection(worker, raw, code):
    ws = ws_connect(worker)
    try:
        ws.send(raw)
        err = json.loads(ws.recv())
        assert err["type"] == "error" and err["code"] == code, err
        ws.send(json.dumps({"text": "Still fine."}))
        assert ws_collect(ws)[2]["type"] == "done"
    finally:
        ws.close()


@pytest.mark.parametrize("bad", ["{not json", DEEP], ids=["not-json", "deeply-nested"])
def test_ws_bad_message_mid_stream_is_answered_and_the_stream_goes_on(worker, bad):
    text = " ".join(f"This is sentence {i}, spoken at an easy pace." for i in range(30))
    ws = ws_connect(worker)
    try:
        ws.send(json.dumps({"text": text}))
        assert json.loads(ws.recv())["type"] == "header"
        ws.send(bad)
        while isinstance(msg := ws.recv(), bytes):
            pass
        assert json.loads(msg)["code"] == "invalid_json"
        assert isinstance(ws.recv(), bytes)  # still streaming
        ws.send(json.dumps({"type": "cancel"}))
        ws.send(json.dumps({"type": "cancel"}))  # a second cancel: nothing left to cancel
        while isinstance(msg := ws.recv(), bytes):
            pass
        assert json.loads(msg)["type"] == "cancelled"
        assert json.loads(ws.recv())["code"] == "nothing_to_cancel"
    finally:
        ws.close()


def test_worker_is_healthy_after_all_of_it(worker):
    healthy(worker)
    assert requests.post(f"{worker.url}/tts", json={"text": "Still here."}).status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# VoxCPM: text its normaliser turns into nothing.
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def voxcpm_worker(tmp_path_factory):
    ckpt = build_checkpoint(tmp_path_factory.mktemp("bad-ckpt") / "tiny", size="tiny", seed=0)
    env = {"TTS_ENGINE": "voxcpm", "MODEL_DIR": str(ckpt), "TTS_DEVICE": "cpu", "TTS_MAX_BATCH": "1",
           "VOXCPM_MAX_LEN": "16", "VOXCPM_INFERENCE_TIMESTEPS": "2"}
    with start_worker(tmp_path_factory.mktemp("bad-vox"), env) as w:
        yield w


@pytest.mark.parametrize("text", ["...", "\U0001F600", "#"])
def test_voxcpm_normalize_that_leaves_nothing_is_400_not_500(voxcpm_worker, text):
    """normalize=true: "..." and emoji have nothing speakable and are refused before the engine; "#" is
    read out by other voices, but VoxCPM's normaliser (wetext) deletes it: the engine says so (400)."""
    mark = log_mark(voxcpm_worker)
    r = requests.post(f"{voxcpm_worker.url}/v1/audio/speech",
                      json={"input": text, "normalize": True, "response_format": "wav"}, timeout=60)
    assert_client_error(r, 400, "nothing_to_say")
    assert_no_traceback_since(voxcpm_worker, mark)


# ---------------------------------------------------------------------------------------------------------------
# Bad settings: the operator's input.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env,says", [
    ({"TTS_ENGINE": "foo", "QUEUE_SIZE": "abc"}, ["TTS_ENGINE='foo'", "QUEUE_SIZE='abc'", ".env.example"]),
    ({"TTS_ENGINE": "voxcpm"}, ["needs MODEL_DIR"]),
    # Threads must hold the queue, the WebSockets, a batch and the health checks' reserve.
    ({"GUNICORN_THREADS": "12", "QUEUE_SIZE": "8"}, ["leaves -1 threads for synthesis",
                                                     "raise GUNICORN_THREADS to at least 14"]),
    ({"GUNICORN_THREADS": "16", "QUEUE_SIZE": "11"}, ["raise GUNICORN_THREADS to at least 18"]),
    ({"TTS_MAX_BATCH": "8", "GUNICORN_THREADS": "16", "QUEUE_SIZE": "8"},
     ["TTS_MAX_BATCH=8 is more than the 2 requests", "raise GUNICORN_THREADS to at least 22"]),
])
def test_bad_settings_stop_the_worker_with_one_readable_line(tmp_path, env, says):
    import os
    import subprocess
    from pathlib import Path

    from .support.procs import PYTHON, REPO_ROOT, free_port

    gunicorn = str(Path(PYTHON).with_name("gunicorn"))
    full = {**os.environ, "BIND": f"127.0.0.1:{free_port()}", "VOICES_DIR": str(tmp_path), **env}
    full.pop("MODEL_DIR", None)
    r = subprocess.run([gunicorn, "-c", str(REPO_ROOT / "service/gunicorn.conf.py"), "service.app:create_app()"],
                       env=full, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and all(s in r.stderr for s in says), r.stderr[-2000:]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "TRACE"])
def test_other_methods_on_the_websocket_endpoint_are_405_with_allow(worker, method):
    r = requests.request(method, f"{worker.url}/v1/stream")
    err = assert_client_error(r, 405, "method_not_allowed")
    assert "GET" in r.headers["Allow"] and "GET" in err["message"]
