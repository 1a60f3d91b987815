"""Usage per client: the gateway names the caller (X-Client-Id), the worker counts requests, characters
and audio seconds per client in /metrics and /v1/usage, and refuses a client whose daily character quota
is spent with 429 + Retry-After until 00:00 UTC.

Through the real gateway (nginx rendered by render.sh) in front of a real gunicorn worker on the timed
fake engine, with a bearer key and with basic auth; the quota's arithmetic and its day on a set clock.
"""
import datetime as dt
import hashlib
import json
import time
from contextlib import contextmanager

import pytest
import requests
import websocket

from service.metrics import Metrics
from service.settings import Settings
from service.usage import OTHER, QuotaExceeded, Usage

from .support.gateway import start_gateway, wait_ready_through
from .support.slow_engine import RATE, SlowEngine
from .support.worker import SLOW_APP, start_worker

USER, PASSWORD = "alice", "correct horse battery"
KEY = "vbx_" + "0123456789abcdef" * 3
OTHER_KEY = "vbx_" + "fedcba9876543210" * 3
WS_KEY = "vbx_" + "5555aaaa5555aaaa" * 3
KEY_CLIENT = "key:" + hashlib.sha256(KEY.encode()).hexdigest()[:16]
OTHER_CLIENT = "key:" + hashlib.sha256(OTHER_KEY.encode()).hexdigest()[:16]
QUOTA = 60


# --- the counts and the quota, on a set clock ------------------------------------------------------------

class Clock:
    def __init__(self, when: dt.datetime):
        self.now = when.timestamp()

    def __call__(self) -> float:
        return self.now


def test_quota_is_per_client_per_utc_day_and_overrides_replace_it():
    clock = Clock(dt.datetime(2026, 3, 1, 23, 59, 0, tzinfo=dt.timezone.utc))
    usage = Usage(Metrics(), daily_char_quota=100, quotas={"user:bob": 0, "user:carol": 10}, clock=clock)
    usage.admit("user:alice", 60)
    usage.admit("user:alice", 40)
    with pytest.raises(QuotaExceeded) as e:
        usage.admit("user:alice", 1)
    assert e.value.retry_after == 60  # seconds to 00:00 UTC
    assert "100 characters" in str(e.value) and "0 left" in str(e.value) and "00:00 UTC" in str(e.value)
    usage.admit("user:bob", 10_000)  # 0: no quota for bob
    with pytest.raises(QuotaExceeded):
        usage.admit("user:carol", 11)
    usage.refund("user:alice", 30)  # a request the queue refused gives its characters back
    usage.admit("user:alice", 30)
    report = usage.report("user:alice")
    assert report == {"client": "user:alice", "day": "2026-03-01", "requests": 0, "characters": 100,
                      "audio_seconds": 0.0, "daily_char_quota": 100, "remaining_characters": 0,
                      "resets_at": "2026-03-02T00:00:00Z"}
    clock.now += 61  # a new UTC day
    usage.admit("user:alice", 100)
    assert usage.report("user:alice")["day"] == "2026-03-02"


def test_client_ids_are_checked_and_their_number_bounded():
    usage = Usage(Metrics(), max_clients=2)
    assert usage.client(None) == usage.client("") == usage.client("admin") == "anonymous"
    assert usage.client("key:" + "x" * 65) == "anonymous" and usage.client("user:a b") == "anonymous"
    assert usage.client("user:alice") == "user:alice"  # the second one (anonymous was the first)
    assert usage.client("user:bob") == OTHER  # beyond USAGE_MAX_CLIENTS: counted together
    assert usage.client("user:alice") == "user:alice"


@pytest.mark.parametrize("raw,problem", [
    ("[1]", "must be a JSON object"), ("{", "not valid JSON"), ('{"alice": 5}', "not a client id"),
    ('{"user:alice": -1}', "whole number"), ('{"user:alice": "5"}', "whole number"),
])
def test_bad_client_quotas_setting_is_refused(raw, problem):
    with pytest.raises(ValueError, match=problem):
        Settings(client_char_quotas=raw)


@contextmanager
def served_app(settings: Settings, engine):
    """The real app in this process on `engine`, once its model is warmed up."""
    from service.app import create_app

    app = create_app(settings, engine=engine)
    ctx = app.extensions["voxbox"]
    try:
        deadline = time.monotonic() + 30
        while not ctx.scheduler.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ctx.scheduler.ready
        yield app
    finally:
        for runtime in ctx.models:
            runtime.scheduler.stop()


class FailingEngine(SlowEngine):
    """Serial generation that fails before its first audio on text with "boom" in it (warm-up passes), as a
    model whose device fell over."""
    supports_batching = False

    def stream(self, text, preset, prompt, params, carry=None):
        if "boom" in text:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield from super().stream(text, preset, prompt, params, carry)


@pytest.mark.parametrize("path,body", [("/tts", {}), ("/v1/audio/speech", {"stream": True, "response_format": "pcm"}),
                                       ("/v1/audio/speech", {"stream_format": "sse", "response_format": "pcm"})])
def test_a_request_the_worker_failed_before_any_audio_does_not_spend_the_quota(tmp_path, path, body):
    with served_app(Settings(voices_dir=tmp_path / "voices", daily_char_quota=30), FailingEngine(0.001, 2)) as app:
        client, text = app.test_client(), "Twenty letters, boom."
        for _ in range(2):  # the retry the 500 invites is admitted: the failed attempt cost nothing
            r = client.post(path, json={"text" if path == "/tts" else "input": text, **body})
            assert r.status_code == 500 and r.get_json()["error"]["code"] == "synthesis_failed", r.get_data()
        report = client.get("/v1/usage").get_json()
        assert report["characters"] == 0 and report["remaining_characters"] == 30


def test_a_stream_counts_the_audio_its_consumer_took_not_a_piece_it_left_unsent(tmp_path):
    """A WebSocket pulls a piece, sees the client's cancel and sends nothing more: that piece was never heard."""
    from service.encode import StreamEncoder
    from service.engines import SynthesisParams

    with served_app(Settings(voices_dir=tmp_path / "voices"), SlowEngine(0.001, 8)) as app:
        svc = app.extensions["voxbox"].synthesis
        prep = svc.start("One sentence to say.", "auto", "default", SynthesisParams(), RATE, stream=True,
                         endpoint="websocket", client="user:ws")
        pieces = svc.stream(prep, StreamEncoder("pcm", RATE, RATE), lambda: False)
        sent = next(pieces)
        next(pieces)  # pulled, then the cancel arrives: not sent
        pieces.close()
        assert svc.usage.report("user:ws")["audio_seconds"] == round(len(sent) / 2 / RATE, 3) > 0


# --- through the real gateway -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("usage")
    env = {"DAILY_CHAR_QUOTA": str(QUOTA), "CLIENT_CHAR_QUOTAS": f'{{"{OTHER_CLIENT}": 0}}',
           "SLOW_STEP_S": "0.002", "SLOW_STEPS": "5"}
    with start_worker(tmp, env, app=SLOW_APP) as worker:
        gw_env = {"BASIC_AUTH_USERS": f"{USER}:{PASSWORD}", "API_KEYS": f"{KEY},{OTHER_KEY},{WS_KEY}",
                  "RATE_LIMIT_RPS": "200", "RATE_LIMIT_BURST": "200"}
        with start_gateway(tmp, f"127.0.0.1:{worker.port}", gw_env) as g:
            wait_ready_through(g, (USER, PASSWORD))
            g.worker = worker
            yield g


def metric(gw, name: str, client: str) -> float:
    text = requests.get(f"{gw.url}/metrics", auth=(USER, PASSWORD), timeout=10).text
    line = next((ln for ln in text.splitlines() if ln.startswith(f'{name}_total{{client="{client}"}}')), None)
    return float(line.split()[-1]) if line else 0.0


@pytest.mark.parametrize("auth", ["bearer", "basic"])
def test_usage_is_counted_per_key_and_per_user_and_the_quota_answers_429(gw, auth):
    kw = {"headers": {"Authorization": f"Bearer {KEY}"}} if auth == "bearer" else {"auth": (USER, PASSWORD)}
    client = KEY_CLIENT if auth == "bearer" else f"user:{USER}"
    # A client's own X-Client-Id is replaced by the gateway's: it can neither pose as another client nor
    # escape its quota.
    kw.setdefault("headers", {})["X-Client-Id"] = OTHER_CLIENT
    before = requests.get(f"{gw.url}/v1/usage", timeout=10, **kw)
    assert before.status_code == 200 and before.json()["client"] == client
    assert before.json()["characters"] == 0 and before.json()["daily_char_quota"] == QUOTA

    text = "Twenty-five characters ok"  # 25
    for path, body in (("/tts", {"text": text}), ("/v1/audio/speech", {"input": text, "response_format": "pcm",
                                                                        "stream": True})):
        r = requests.post(gw.url + path, json=body, timeout=30, **kw)
        assert r.status_code == 200, r.text
    # 50 used of 60: a request of 11 more is refused before it is queued, one of 10 still fits.
    r = requests.post(f"{gw.url}/v1/audio/speech", json={"input": "x" * 11, "response_format": "pcm"}, timeout=30,
                      **kw)
    assert r.status_code == 429 and r.headers["Content-Type"] == "application/json"
    err = r.json()["error"]
    assert err["code"] == "quota_exceeded" and client in err["message"] and "10 left" in err["message"]
    midnight = dt.datetime.combine(dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=1), dt.time(),
                                   dt.timezone.utc)
    assert abs(int(r.headers["Retry-After"]) - (midnight - dt.datetime.now(dt.timezone.utc)).total_seconds()) < 5
    r = requests.post(f"{gw.url}/tts", json={"text": "ten chars!"}, timeout=30, **kw)
    assert r.status_code == 200, r.text

    report = requests.get(f"{gw.url}/v1/usage", timeout=10, **kw).json()
    assert report["requests"] == 3 and report["characters"] == QUOTA and report["remaining_characters"] == 0
    # Five 50 ms tone steps per sentence (SLOW_STEPS=5), one sentence per request.
    assert report["audio_seconds"] == pytest.approx(3 * 5 * 0.05, abs=0.01)
    assert metric(gw, "voxbox_client_requests", client) == 3
    assert metric(gw, "voxbox_client_characters", client) == QUOTA
    assert metric(gw, "voxbox_client_audio_seconds", client) == pytest.approx(3 * 5 * 0.05, abs=0.01)
    assert metric(gw, "voxbox_client_quota_refused", client) == 1
    assert metric(gw, "voxbox_client_requests", OTHER_CLIENT) == 0  # the spoofed id counted nothing


def test_the_quota_holds_on_websockets_too(gw):

    # A client of its own (a fresh day's quota), named at the handshake: its own X-Client-Id is replaced.
    ws = websocket.create_connection(gw.url.replace("http", "ws") + "/v1/stream", timeout=30,
                                     header=[f"Authorization: Bearer {WS_KEY}", "X-Client-Id: user:nobody"])
    try:
        ws.send(json.dumps({"text": "z" * QUOTA}))
        while isinstance(msg := ws.recv(), bytes) or json.loads(msg)["type"] == "header":
            pass
        assert json.loads(msg)["type"] == "done"
        ws.send(json.dumps({"text": "one more"}))
        error = json.loads(ws.recv())
    finally:
        ws.close()
    assert error["type"] == "error" and error["code"] == "quota_exceeded" and error["retry_after"] > 0
    client = "key:" + hashlib.sha256(WS_KEY.encode()).hexdigest()[:16]
    assert client in error["message"] and metric(gw, "voxbox_client_characters", client) == QUOTA


def test_sse_usage_counts_the_text_without_ssml_markup(gw):
    text = '<speak>Hello <break time="100ms"/>there.</speak>'
    r = requests.post(f"{gw.url}/v1/audio/speech", json={"input": text, "response_format": "pcm",
                                                          "stream_format": "sse"},
                      headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=30)
    done = [line for line in r.text.splitlines() if "speech.audio.done" in line]
    assert r.status_code == 200 and done
    assert json.loads(done[0].removeprefix("data: "))["usage"]["input_tokens"] == len("Hello\nthere.")


def test_a_per_key_override_lifts_the_quota(gw):
    headers = {"Authorization": f"Bearer {OTHER_KEY}"}
    before = requests.get(f"{gw.url}/v1/usage", headers=headers, timeout=10).json()["characters"]
    for _ in range(2):
        r = requests.post(f"{gw.url}/tts", json={"text": "y" * QUOTA}, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
    report = requests.get(f"{gw.url}/v1/usage", headers=headers, timeout=10).json()
    assert report["client"] == OTHER_CLIENT and report["characters"] == before + 2 * QUOTA
    assert report["daily_char_quota"] is None and report["remaining_characters"] is None


def test_a_bare_worker_counts_callers_without_a_gateway_id_as_anonymous(gw):
    r = requests.get(f"{gw.worker.url}/v1/usage", headers={"X-Client-Id": "not an id"}, timeout=10)
    assert r.status_code == 200 and r.json()["client"] == "anonymous"
