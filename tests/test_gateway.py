"""The gateway: real nginx (rendered by nginx/render.sh) in front of a real gunicorn worker."""
import base64
import json
import time

import pytest
import requests

from .support.gateway import raw_get, render, start_gateway
from .support.procs import free_port
from .support.worker import start_worker

USER, PASSWORD = "alice", "correct horse battery"
KEY = "vbx_" + "0123456789abcdef" * 3  # as long as run-stack.sh generates: map hash sizes matter
BASIC = (USER, PASSWORD)
BEARER = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with start_worker(tmp_path_factory.mktemp("gw-worker"), {"QUEUE_SIZE": "8"}) as w:
        yield w


@pytest.fixture(scope="module")
def gateway(worker, tmp_path_factory):
    env = {"BASIC_AUTH_USERS": f"{USER}:{PASSWORD}", "API_KEYS": KEY, "RATE_LIMIT_RPS": "50",
           "RATE_LIMIT_BURST": "50", "MAX_JSON_BODY": "64k", "MAX_UPLOAD_BODY": "2m"}
    with start_gateway(tmp_path_factory.mktemp("gw"), f"127.0.0.1:{worker.port}", env) as gw:
        yield gw


def test_rendered_config_passes_nginx_t(tmp_path):
    port = free_port()
    r = render(tmp_path / "ngx", "127.0.0.1:9", port, {"BASIC_AUTH_USERS": "u:p", "API_KEYS": KEY}, mode="--test")
    assert r.returncode == 0, r.stderr
    assert "test is successful" in r.stderr


def test_no_credentials_refuses_to_start(tmp_path):
    r = render(tmp_path / "ngx", "127.0.0.1:9", free_port(), {"BASIC_AUTH_USERS": "", "API_KEYS": ""})
    assert r.returncode != 0 and "never runs open" in r.stderr


def test_bad_api_key_is_refused_at_render(tmp_path):
    r = render(tmp_path / "ngx", "127.0.0.1:9", free_port(), {"API_KEYS": 'short"key'})
    assert r.returncode != 0 and "must be 16-256 characters" in r.stderr


def test_htpasswd_is_hashed_and_world_readable(gateway):
    line = (gateway.prefix / "generated" / "htpasswd").read_text().strip()
    assert line.startswith(f"{USER}:$apr1$") and PASSWORD not in line
    assert (gateway.prefix / "generated" / "htpasswd").stat().st_mode & 0o004


def test_healthz_is_open(gateway):
    assert requests.get(f"{gateway.url}/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("kwargs", [{}, {"auth": (USER, "wrong")}, {"auth": ("mallory", PASSWORD)},
                                    {"headers": {"Authorization": "Bearer wrong-key-0123456789"}},
                                    {"headers": {"Authorization": f"Bearer {KEY}x"}}],
                         ids=["none", "wrong-password", "wrong-user", "wrong-key", "key-suffix"])
def test_unauthenticated_is_401_json(gateway, kwargs):
    r = requests.post(f"{gateway.url}/tts", json={"text": "hi"}, **kwargs)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    assert "Basic" in r.headers["WWW-Authenticate"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_basic_auth_works(gateway):
    r = requests.post(f"{gateway.url}/tts", json={"text": "Hello through the gateway."}, auth=BASIC)
    assert r.status_code == 200, r.text
    assert base64.b64decode(r.json()["audio_base64"])[:4] == b"RIFF"


def test_bearer_key_works_and_is_not_forwarded(gateway, worker):
    r = requests.post(f"{gateway.url}/tts", json={"text": "Hello with a key."}, headers=BEARER)
    assert r.status_code == 200, r.text
    assert "Server" not in r.headers or "nginx/" not in r.headers["Server"]  # server_tokens off
    assert KEY not in worker.log_text() and KEY not in gateway.log_text()


def test_request_id_reaches_worker_and_access_log_is_json(gateway, worker):
    rid = "gw-trace-42"
    r = requests.post(f"{gateway.url}/tts", json={"text": "Trace."}, auth=BASIC, headers={"X-Request-ID": rid})
    assert r.headers["X-Request-ID"] == rid
    time.sleep(0.3)
    assert rid in worker.log_text()
    entries = [json.loads(line) for line in gateway.log_text().splitlines() if line.startswith("{")]
    mine = [e for e in entries if e["request_id"] == rid]
    assert mine and mine[0]["user"] == USER and mine[0]["status"] == 200 and mine[0]["upstream_time"]
    generated = requests.get(f"{gateway.url}/info", auth=BASIC).headers["X-Request-ID"]
    assert len(generated) == 32  # nginx's own id when the client sends none
    for junk in ("x" * 300, "a b\tc", "id\u00e9".encode().decode("latin-1")):  # too long, spaces, raw bytes
        got = requests.get(f"{gateway.url}/info", auth=BASIC, headers={"X-Request-ID": junk}).headers["X-Request-ID"]
        assert got != junk and len(got) == 32, got  # replaced, not echoed into logs


def test_oversized_headers_get_json(gateway):
    # Malformed request lines, long URLs and the rest: test_gateway_edges.test_nginx_errors_are_json.
    r = requests.get(f"{gateway.url}/info", auth=BASIC, headers={"X-Big": "b" * 20000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", (r.text, gateway.log_text()[-1500:])


def test_path_tricks_and_the_bearer_scheme_in_front_of_the_worker(gateway):
    for target in ("/info/../healthz", "/info%2F..%2Fhealthz", "/./healthz"):
        status, _, body = raw_get(gateway.port, target)
        assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized", (target, body)
    for scheme in ("bearer", "BEARER"):
        r = requests.get(f"{gateway.url}/info", headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200 and r.json()["engine"]["name"] == "embedded"


def test_body_over_limit_is_413_json(gateway):
    r = requests.post(f"{gateway.url}/tts", data=json.dumps({"text": "a" * 70_000}), auth=BASIC,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_upload_limit_is_larger_than_json_limit(gateway):
    r = requests.post(f"{gateway.url}/v1/voices", auth=BASIC, files={"file": ("x.wav", b"\0" * 100_000)},
                      data={"name": "n", "text": "t"})
    # Reached the worker (not a gateway 413), whose embedded engine takes no uploads.
    assert r.status_code == 400 and r.json()["error"]["code"] == "cloning_not_supported"
    r = requests.post(f"{gateway.url}/v1/voices", auth=BASIC, files={"file": ("x.wav", b"\0" * 3_000_000)},
                      data={"name": "n", "text": "t"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_stream_passes_through_unbuffered(gateway):
    text = " ".join(f"This is sentence number {i} of a long streamed answer." for i in range(12))
    t0 = time.monotonic()
    with requests.post(f"{gateway.url}/v1/audio/speech", headers=BEARER, stream=True,
                       json={"input": text, "response_format": "pcm", "stream": True}) as r:
        assert r.status_code == 200 and r.headers["X-Sample-Rate"] == "44100"
        arrivals = []
        for chunk in r.iter_content(chunk_size=None):
            arrivals.append(time.monotonic() - t0)
    assert len(arrivals) >= 3
    assert arrivals[0] < 0.6 * arrivals[-1]  # the first audio came well before the end


def test_upstream_down_is_503_json(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    with start_gateway(tmp_path, dead, {"BASIC_AUTH_USERS": f"{USER}:{PASSWORD}"}) as gw:
        r = requests.post(f"{gw.url}/tts", json={"text": "hi"}, auth=BASIC)
        assert r.status_code == 503 and r.json()["error"]["code"] == "worker_unavailable"
        assert r.headers["Retry-After"]


def test_worker_not_ready_is_503_json_through_gateway(tmp_path):
    (tmp_path / "empty").mkdir()
    with start_worker(tmp_path / "w", {"TTS_ENGINE": "voxcpm", "MODEL_DIR": str(tmp_path / "empty")},
                      wait_ready=False) as w, \
            start_gateway(tmp_path / "g", f"127.0.0.1:{w.port}", {"BASIC_AUTH_USERS": f"{USER}:{PASSWORD}"}) as gw:
        r = requests.get(f"{gw.url}/readyz", auth=BASIC)
        assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["status"] == "not_ready"


def test_rate_limit_is_429_json(tmp_path, worker):
    env = {"BASIC_AUTH_USERS": f"{USER}:{PASSWORD}", "RATE_LIMIT_RPS": "1", "RATE_LIMIT_BURST": "2"}
    with start_gateway(tmp_path, f"127.0.0.1:{worker.port}", env) as gw:
        codes = [requests.get(f"{gw.url}/info", auth=BASIC) for _ in range(8)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited and codes[0].status_code == 200
    assert limited[0].json()["error"]["code"] == "rate_limited" and limited[0].headers["Retry-After"]


def test_ip_allowlist(tmp_path, worker):
    env = {"BASIC_AUTH_USERS": f"{USER}:{PASSWORD}", "ALLOW_CIDRS": "10.0.0.0/8"}
    with start_gateway(tmp_path / "deny", f"127.0.0.1:{worker.port}", env) as gw:
        r = requests.get(f"{gw.url}/info", auth=BASIC)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    env["ALLOW_CIDRS"] = "10.0.0.0/8,127.0.0.0/8"
    with start_gateway(tmp_path / "allow", f"127.0.0.1:{worker.port}", env) as gw:
        assert requests.get(f"{gw.url}/info", auth=BASIC).status_code == 200


def test_openai_sdk_through_gateway(gateway):
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY)
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello from the OpenAI SDK.",
                                       response_format="wav")
    assert audio.content[:4] == b"RIFF" and len(audio.content) > 20_000
    # The SDK's current call with instructions, in AAC: through the gateway, the header saying they were ignored too.
    aac = client.audio.speech.with_raw_response.create(model="gpt-4o-mini-tts", voice="alloy", input="Hello again.",
                                                       instructions="Speak in a cheerful tone.", response_format="aac")
    assert aac.headers["content-type"] == "audio/aac" and aac.headers["x-instructions-ignored"] == "true"
    assert aac.parse().content[:2] == b"\xff\xf1"  # an ADTS frame's sync word
    bad = OpenAI(base_url=f"{gateway.url}/v1", api_key="not-a-valid-key-000000", max_retries=0)
    with pytest.raises(Exception) as e:
        bad.audio.speech.create(model="tts-1", voice="alloy", input="x")
    assert "401" in str(e.value)


def test_websocket_through_gateway_needs_credentials(gateway):
    import websocket

    url = gateway.url.replace("http://", "ws://") + "/v1/stream"
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(url, timeout=10)
    assert e.value.status_code == 401
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for header in ([f"Authorization: Basic {token}"], [f"Authorization: Bearer {KEY}"]):
        ws = websocket.create_connection(url, header=header, timeout=30)
        ws.send(json.dumps({"text": "Through the gateway, over a WebSocket."}))
        kinds = []
        while True:
            msg = ws.recv()
            kinds.append("audio" if isinstance(msg, bytes) else json.loads(msg)["type"])
            if kinds[-1] in ("done", "error"):
                break
        ws.close()
        assert kinds[0] == "header" and "audio" in kinds and kinds[-1] == "done"


def test_ui_is_served_behind_auth(gateway):
    assert requests.get(f"{gateway.url}/").status_code == 401
    page = requests.get(f"{gateway.url}/", auth=BASIC)
    assert page.status_code == 200 and "VoxBox" in page.text
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]


def test_tls_with_mounted_certificate(tmp_path, worker):
    import subprocess

    import urllib3

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    cert.chmod(0o644)
    key.chmod(0o644)  # read by nginx's unprivileged workers in this test; mount it read-only in production
    env = {"BASIC_AUTH_USERS": f"{USER}:{PASSWORD}", "TLS_CERT": str(cert), "TLS_KEY": str(key)}
    urllib3.disable_warnings()
    with start_gateway(tmp_path / "tls", f"127.0.0.1:{worker.port}", env) as gw:
        url = gw.url.replace("http://", "https://")
        r = requests.get(f"{url}/info", auth=BASIC, verify=False)
        assert r.status_code == 200 and r.json()["engine"]["name"] == "embedded"
        assert r.headers["Strict-Transport-Security"].startswith("max-age=")
        plain = requests.get(f"{gw.url}/info", auth=BASIC, timeout=5)
        assert plain.status_code == 400 and "HTTPS port" in plain.json()["error"]["message"]  # no plain HTTP on it
