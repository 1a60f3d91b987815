"""GET /v1/stream over a real WebSocket to real gunicorn (flask-sock, gthread)."""
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import websocket

from .support.worker import start_worker, ws_collect

PARAGRAPHS = " ".join(
    f"Paragraph {p}. " + " ".join(f"This is sentence {s} of paragraph {p}, spoken at an easy pace." for s in range(4))
    for p in range(4))


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    # Room for a few sockets at once: a closed one frees its slot only when the server sees the close,
    # so the next test's handshake could meet the default cap (threads / 8 = 2) and get 503.
    env = {"MAX_TEXT_CHARS": "3000", "GUNICORN_THREADS": "32", "WS_MAX_CONNECTIONS": "8"}
    with start_worker(tmp_path_factory.mktemp("ws"), env) as w:
        yield w


def connect(worker):
    return websocket.create_connection(worker.ws_url, timeout=60)


@pytest.fixture
def ws(worker):
    conn = connect(worker)
    yield conn
    conn.close()


def test_header_chunks_done(ws):
    ws.send(json.dumps({"text": "Hello there. Streaming over a WebSocket works.", "format": "pcm16",
                        "sample_rate": 24000}))
    header, chunks, done = ws_collect(ws)
    assert header == {"type": "header", "sample_rate": 24000, "channels": 1, "format": "pcm16",
                      "sample_format": "s16le"}
    assert done["type"] == "done" and done["chunks"] == len(chunks) >= 1
    pcm = np.frombuffer(b"".join(c for _, c in chunks), "<i2")
    assert abs(pcm.size / 24000 - done["duration"]) < 0.1 and np.abs(pcm).max() > 1000
    assert 0 < done["ttfa"] <= done["latency"]


def test_wav_format_starts_with_a_header(ws):
    ws.send(json.dumps({"text": "Wave format.", "format": "wav"}))
    _, chunks, done = ws_collect(ws)
    assert chunks[0][1][:4] == b"RIFF" and done["type"] == "done"


def test_several_requests_per_connection(ws):
    for text in ("First request.", "Second request.", "Third request."):
        ws.send(json.dumps({"text": text}))
        assert ws_collect(ws)[2]["type"] == "done"


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
    # The server really stopped: the next request is not queued behind the rest of the long text.
    ws.send(json.dumps({"text": "After the cancel."}))
    _, chunks, done = ws_collect(ws)
    assert done["type"] == "done" and chunks and done["latency"] < 5


def test_closing_the_connection_mid_stream_stops_the_synthesis(worker):
    first = connect(worker)
    first.send(json.dumps({"text": PARAGRAPHS}))
    assert json.loads(first.recv())["type"] == "header"
    assert isinstance(first.recv(), bytes)
    first.close()
    with_new = connect(worker)
    try:
        t0 = time.monotonic()
        with_new.send(json.dumps({"text": "A new connection is served at once."}))
        assert ws_collect(with_new)[2]["type"] == "done"
        assert time.monotonic() - t0 < 5  # not behind the abandoned long text (~20 s of synthesis)
    finally:
        with_new.close()


def test_a_second_request_while_streaming_is_refused_and_the_stream_goes_on(ws):
    ws.send(json.dumps({"text": PARAGRAPHS}))
    assert json.loads(ws.recv())["type"] == "header"
    ws.send(json.dumps({"text": "Too early."}))
    while True:
        msg = ws.recv()
        if isinstance(msg, bytes):  # audio that was on its way before the refusal
            continue
        body = json.loads(msg)
        assert body["type"] == "error", body
        assert body["code"] == "busy" and "cancel" in body["message"]
        break
    # The running stream is unaffected: audio keeps coming until we cancel it.
    assert isinstance(ws.recv(), bytes)
    ws.send(json.dumps({"type": "cancel"}))
    while isinstance(msg := ws.recv(), bytes):
        pass
    assert json.loads(msg)["type"] == "cancelled"


def test_explicit_synthesize_type_and_knobs(ws):
    ws.send(json.dumps({"type": "synthesize", "text": "Knobs.", "voice": "joe-calm", "speed": 1.5,
                        "sample_rate": 16000, "lang": "en"}))
    header, chunks, done = ws_collect(ws)
    assert header["sample_rate"] == 16000 and done["type"] == "done"
    assert abs(sum(len(c) for _, c in chunks) / 2 / 16000 - done["duration"]) < 0.1


def test_uploaded_voice_on_the_embedded_engine_is_an_error(worker, ws):
    """A voice a VoxCPM deployment stored on the same volume (the embedded engine takes no uploads)."""
    from service.voices import VoiceStore

    t = np.arange(22050 * 3) / 22050
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 22050, format="WAV")
    voice = VoiceStore(Path(worker.env["VOICES_DIR"]), 10 * 2**20, 2.0, 30.0).create(
        "Clone me", "Some words.", buf.getvalue())
    ws.send(json.dumps({"text": "hi", "voice": voice.id}))
    err = json.loads(ws.recv())
    assert err["type"] == "error" and err["code"] == "voice_not_supported" and "cannot clone" in err["message"]
    ws.send(json.dumps({"text": "Still fine."}))
    assert ws_collect(ws)[2]["type"] == "done"


@pytest.mark.parametrize("raw,code", [
    ("{not json", "invalid_json"),
    ("[1,2]", "invalid_json"),
    (json.dumps({"text": "hi", "volume": 11}), "invalid_request"),
    (json.dumps({"text": ""}), "invalid_text"),
    (json.dumps({"text": "hi", "voice": "nobody"}), "unknown_voice"),
    (json.dumps({"text": "hi", "format": "mp3"}), "invalid_request"),
    (json.dumps({"voice": "joe"}), "invalid_request"),
    (json.dumps({"text": 42}), "invalid_request"),
    (json.dumps({"text": "hi", "speed": 10}), "invalid_request"),
    (json.dumps({"text": "hi", "cfg_value": 99}), "invalid_request"),
    (json.dumps({"text": "hi", "inference_timesteps": 0}), "invalid_request"),
    (json.dumps({"type": "dance"}), "invalid_request"),
    (json.dumps({"text": "   "}), "invalid_text"),
    (json.dumps({"text": "hi", "sample_rate": 1234}), "unsupported_sample_rate"),
    (json.dumps({"text": "x" * 3001}), "text_too_long"),
    (json.dumps({"type": "cancel"}), "nothing_to_cancel"),
])
def test_bad_message_gets_error_and_connection_stays_usable(ws, raw, code):
    ws.send(raw)
    err = json.loads(ws.recv())
    assert err["type"] == "error" and err["code"] == code and err["message"]
    ws.send(json.dumps({"text": "Still fine."}))
    assert ws_collect(ws)[2]["type"] == "done"


def test_an_oversized_message_closes_the_connection_with_1009(worker):
    conn = connect(worker)
    try:
        conn.send(json.dumps({"text": "x" * 2_000_000}))
        # The raw frame: recv_data would answer the close, racing the server's own socket close.
        frame = conn.recv_frame()
        assert frame.opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(frame.data[:2], "big") == 1009, frame
    finally:
        conn.close()
def test_binary_message_is_refused(ws):
    ws.send_binary(b"\x00\x01")
    assert json.loads(ws.recv())["code"] == "invalid_message"


def test_long_text_streams_first_audio_long_before_the_end(ws):
    t0 = time.monotonic()
    ws.send(json.dumps({"text": PARAGRAPHS}))
    _, chunks, done = ws_collect(ws)
    total = time.monotonic() - t0
    first = chunks[0][0] - t0
    assert done["type"] == "done" and len(chunks) >= 4
    assert first < 0.5 * total, (first, total)
    assert done["ttfa"] < 0.5 * done["latency"]


def test_keepalive_pings_keep_idle_connections_and_drop_silent_clients(tmp_path):
    """WS_PING_INTERVAL_S: the worker pings; a client that answers stays connected while idle (and
    can still synthesize); one that never reads, so never answers, is disconnected."""
    with start_worker(tmp_path, {"WS_PING_INTERVAL_S": "0.5"}) as w:
        alive = websocket.create_connection(w.ws_url, timeout=10)
        silent = websocket.create_connection(w.ws_url, timeout=10)
        pings = 0
        until = time.monotonic() + 2.5
        while time.monotonic() < until:  # reading answers every ping with a pong (websocket-client does it)
            frame = alive.recv_data_frame(control_frame=True)[1]
            pings += frame.opcode == websocket.ABNF.OPCODE_PING
        assert pings >= 3
        assert outcome(alive) == "served"
        alive.close()

        time.sleep(2)  # pings every 0.5 s went unanswered: the worker has closed it
        assert outcome(silent) == "closed"


def outcome(conn) -> str:
    """Send a request on a connection: "served" if its audio arrives, "closed" if the peer is gone."""
    try:
        conn.send(json.dumps({"text": "Anyone there?"}))
        while True:
            opcode, frame = conn.recv_data_frame(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return "closed"
            if opcode == websocket.ABNF.OPCODE_TEXT and json.loads(frame.data)["type"] == "done":
                return "served"
    except (websocket.WebSocketConnectionClosedException, OSError):
        return "closed"


def test_instructions_are_said_ignored_in_header_and_done(ws):
    ws.send(json.dumps({"text": "Cheerful, please.", "instructions": "Speak in a cheerful tone."}))
    header, _, done = ws_collect(ws)
    assert header["instructions_ignored"] is True and done["instructions_ignored"] is True
    ws.send(json.dumps({"text": "No instructions."}))
    header, _, done = ws_collect(ws)
    assert "instructions_ignored" not in header and "instructions_ignored" not in done
    ws.send(json.dumps({"text": "Too many.", "instructions": "x" * 1001}))
    err = json.loads(ws.recv())
    assert err["type"] == "error" and err["code"] == "invalid_request" and "instructions" in err["message"]


def test_done_carries_captions_when_asked(ws):
    text = "First sentence of two, with captions. And here is the second one, which ends it."
    ws.send(json.dumps({"text": text, "timestamps": "sentence", "sample_rate": 16000}))
    _, chunks, done = ws_collect(ws)
    seconds = sum(len(c) for _, c in chunks) / 2 / 16000
    captions = done["captions"]
    assert " ".join(c["text"] for c in captions) == text and len(captions) >= 2 and captions[0]["start"] == 0
    assert all(a["end"] == b["start"] and a["start"] < a["end"] for a, b in zip(captions, captions[1:]))
    assert abs(captions[-1]["end"] - seconds) <= 1 / 50 and abs(done["duration"] - seconds) <= 1 / 50
