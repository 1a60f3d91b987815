"""GET /v1/stream over a real WebSocket to real gunicorn (flask-sock, gthread)."""
import json
import time

import numpy as np
import pytest
import websocket

from .support.worker import start_worker

PARAGRAPHS = " ".join(
    f"Paragraph {p}. " + " ".join(f"This is sentence {s} of paragraph {p}, spoken at an easy pace." for s in range(4))
    for p in range(4))


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with start_worker(tmp_path_factory.mktemp("ws"), {"MAX_TEXT_CHARS": "3000"}) as w:
        yield w


@pytest.fixture
def ws(worker):
    conn = websocket.create_connection(worker.url.replace("http://", "ws://") + "/v1/stream", timeout=60)
    yield conn
    conn.close()


def collect(ws):
    """Read one request's messages: returns (header, [binary chunks with arrival times], final message)."""
    header, chunks = None, []
    while True:
        msg = ws.recv()
        if isinstance(msg, bytes):
            chunks.append((time.monotonic(), msg))
            continue
        body = json.loads(msg)
        if body["type"] == "header":
            header = body
        else:
            return header, chunks, body


def test_header_chunks_done(ws):
    ws.send(json.dumps({"text": "Hello there. Streaming over a WebSocket works.", "format": "pcm16",
                        "sample_rate": 24000}))
    header, chunks, done = collect(ws)
    assert header == {"type": "header", "sample_rate": 24000, "channels": 1, "format": "pcm16",
                      "sample_format": "s16le"}
    assert done["type"] == "done" and done["chunks"] == len(chunks) >= 1
    pcm = np.frombuffer(b"".join(c for _, c in chunks), "<i2")
    assert abs(pcm.size / 24000 - done["duration"]) < 0.1 and np.abs(pcm).max() > 1000
    assert 0 < done["ttfa"] <= done["latency"]


def test_wav_format_starts_with_a_header(ws):
    ws.send(json.dumps({"text": "Wave format.", "format": "wav"}))
    _, chunks, done = collect(ws)
    assert chunks[0][1][:4] == b"RIFF" and done["type"] == "done"


def test_several_requests_per_connection(ws):
    for text in ("First request.", "Second request.", "Third request."):
        ws.send(json.dumps({"text": text}))
        assert collect(ws)[2]["type"] == "done"


def test_cancel_mid_stream_then_connection_still_usable(ws):
    ws.send(json.dumps({"text": PARAGRAPHS}))
    assert json.loads(ws.recv())["type"] == "header"
    assert isinstance(ws.recv(), bytes)  # audio is flowing
    t0 = time.monotonic()
    ws.send(json.dumps({"type": "cancel"}))
    while True:
        msg = ws.recv()
        if isinstance(msg, str):
            break
    assert json.loads(msg)["type"] == "cancelled"
    assert time.monotonic() - t0 < 3  # stopped, not run to the end of 16 sentences
    ws.send(json.dumps({"text": "After the cancel."}))
    assert collect(ws)[2]["type"] == "done"


@pytest.mark.parametrize("raw,code", [
    ("{not json", "invalid_json"),
    ("[1,2]", "invalid_json"),
    (json.dumps({"text": "hi", "volume": 11}), "invalid_request"),
    (json.dumps({"text": ""}), "invalid_text"),
    (json.dumps({"text": "hi", "voice": "nobody"}), "unknown_voice"),
    (json.dumps({"text": "hi", "format": "mp3"}), "invalid_request"),
    (json.dumps({"text": "hi", "sample_rate": 1234}), "unsupported_sample_rate"),
    (json.dumps({"text": "x" * 3001}), "text_too_long"),
    (json.dumps({"type": "cancel"}), "nothing_to_cancel"),
])
def test_bad_message_gets_error_and_connection_stays_usable(ws, raw, code):
    ws.send(raw)
    err = json.loads(ws.recv())
    assert err["type"] == "error" and err["code"] == code and err["message"]
    ws.send(json.dumps({"text": "Still fine."}))
    assert collect(ws)[2]["type"] == "done"


def test_binary_message_is_refused(ws):
    ws.send_binary(b"\x00\x01")
    assert json.loads(ws.recv())["code"] == "invalid_message"


def test_long_text_streams_first_audio_long_before_the_end(ws):
    t0 = time.monotonic()
    ws.send(json.dumps({"text": PARAGRAPHS}))
    _, chunks, done = collect(ws)
    total = time.monotonic() - t0
    first = chunks[0][0] - t0
    assert done["type"] == "done" and len(chunks) >= 4
    assert first < 0.5 * total, (first, total)
    assert done["ttfa"] < 0.5 * done["latency"]
