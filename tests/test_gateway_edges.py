"""The gateway at its edges: what exactly reaches the worker, path tricks, the bearer scheme, per-client
stream caps, JSON for every error nginx answers itself, re-resolving the worker's name, the health listener.

Real nginx rendered by nginx/render.sh. Upstream is a recording HTTP server (tests/support/upstream.py)
where a test must see the headers and raw path nginx sends, or hold requests open for a set time; the
real worker behind the gateway is covered in test_gateway.py.
"""
import hashlib
import json
import socket
import threading
import time

import pytest
import requests

from .support.gateway import raw_get, raw_request, render, start_gateway
from .support.procs import free_port, port_open, wait_until
from .support.upstream import dns_server, recording_server

USER, PASSWORD = "alice", "correct horse battery"
KEY = "vbx_" + "0123456789abcdef" * 3
KEY_ID = "apikey:" + hashlib.sha256(KEY.encode()).hexdigest()[:8]
CLIENT_ID = "key:" + hashlib.sha256(KEY.encode()).hexdigest()[:16]  # X-Client-Id, what usage is counted by
BASIC_TOKEN = "Basic " + __import__("base64").b64encode(f"{USER}:{PASSWORD}".encode()).decode()
CREDS = {"BASIC_AUTH_USERS": f"{USER}:{PASSWORD}", "API_KEYS": KEY}
STREAMS = 2


@pytest.fixture(scope="module")
def upstream():
    with recording_server("worker") as server:
        yield server


@pytest.fixture(scope="module")
def gw(upstream, tmp_path_factory):
    env = {**CREDS, "RATE_LIMIT_RPS": "200", "RATE_LIMIT_BURST": "200", "MAX_STREAMS_PER_CLIENT": str(STREAMS)}
    with start_gateway(tmp_path_factory.mktemp("gw-edges"), f"127.0.0.1:{upstream.port}", env) as g:
        yield g


def json_error(status_headers_body) -> str:
    status, headers, body = status_headers_body
    assert headers.get("content-type") == "application/json", (status, headers, body[:300])
    assert headers.get("x-content-type-options") == "nosniff"
    return json.loads(body)["error"]["code"]


# --- 2: one sanitised header set in every location --------------------------------------------------

LOCATIONS = [("GET", "/healthz", ()), ("GET", "/info", ()), ("GET", "/", ()), ("POST", "/tts", ()),
             ("POST", "/v1/audio/speech", ()), ("GET", "/v1/voices/abc", ()), ("POST", "/v1/voices", ()),
             ("GET", "/v1/stream", ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
                                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="))]
SPOOFED = ("X-Forwarded-For: 203.0.113.9", "X-Forwarded-User: admin", "X-Forwarded-Proto: https",
           "X-Forwarded-Host: evil.example", "X-Forwarded-Port: 443", "X-Forwarded-Prefix: /evil",
           "X-Real-IP: 203.0.113.9", "Forwarded: for=203.0.113.9;proto=https", "X-Client-Id: key:0000000000000000")


@pytest.mark.parametrize("auth", ["basic", "bearer"])
@pytest.mark.parametrize("method,path,extra", LOCATIONS, ids=[f"{m} {p}" for m, p, _ in LOCATIONS])
def test_every_location_sends_the_worker_the_same_sanitised_headers(gw, upstream, auth, method, path, extra):
    rid = f"hdr-{auth}-{method}-{path.strip('/').replace('/', '.') or 'root'}"
    credential = BASIC_TOKEN if auth == "basic" else f"Bearer {KEY}"
    body = ("Content-Length: 2",) if method == "POST" else ()
    request = "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
                           f"Authorization: {credential}", f"X-Request-ID: {rid}", *SPOOFED, *extra, *body])
    status, headers, _ = raw_request(gw.port, (request + "\r\n\r\n" + ("{}" if body else "")).encode())
    assert status == 200 and headers["x-request-id"] == rid
    seen = upstream.by_request_id(rid)["headers"]
    assert "authorization" not in seen  # never the password or the key
    assert seen["x-forwarded-for"] == seen["x-real-ip"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http" and seen["x-forwarded-host"] == "127.0.0.1"
    assert seen["x-forwarded-port"] == str(gw.port)
    assert "x-forwarded-prefix" not in seen and "forwarded" not in seen
    # /healthz runs without authentication: no user name is vouched for there.
    expected_user = None if path == "/healthz" else (USER if auth == "basic" else KEY_ID)
    assert seen.get("x-forwarded-user") == expected_user
    expected_client = None if path == "/healthz" else (f"user:{USER}" if auth == "basic" else CLIENT_ID)
    assert seen.get("x-client-id") == expected_client  # the gateway's, never the client's own
    if path == "/v1/stream":
        assert seen["upgrade"] == "websocket" and seen["connection"].lower() == "upgrade"
        assert seen["sec-websocket-key"] == "dGhlIHNhbXBsZSBub25jZQ=="
    else:
        assert "upgrade" not in seen
    # Without a request id from the client, the worker gets the one the gateway made and returned.
    status, headers, _ = raw_request(gw.port, (request.replace(f"X-Request-ID: {rid}", f"X-Test-Tag: {rid}")
                                               + "\r\n\r\n" + ("{}" if body else "")).encode())
    generated = headers["x-request-id"]
    assert status == 200 and len(generated) == 32
    assert upstream.by_header("x-test-tag", rid)["headers"]["x-request-id"] == generated


# --- 3: /healthz is open only as spelled, and forwarded as the path it matched ------------------------

TRICKS = ["/info/../healthz", "/info%2F..%2Fhealthz", "/./healthz", "//healthz", "/%68ealthz", "/v1/../healthz"]


@pytest.mark.parametrize("target", TRICKS)
def test_path_tricks_to_healthz_need_credentials_and_reach_the_worker_as_healthz(gw, upstream, target):
    rid = "trick-" + hashlib.sha256(target.encode()).hexdigest()[:12]
    assert json_error(raw_get(gw.port, target, f"X-Request-ID: {rid}")) == "unauthorized"
    assert not [s for s in upstream.seen if s["headers"].get("x-request-id") == rid]  # refused by the gateway
    status, _, body = raw_get(gw.port, target, f"X-Request-ID: {rid}", f"Authorization: {BASIC_TOKEN}")
    assert status == 200 and json.loads(body)["path"] == "/healthz"


@pytest.mark.parametrize("target", ["/healthz", "/healthz?probe=1"])
def test_healthz_as_spelled_is_open_and_forwarded_as_healthz(gw, target):
    status, _, body = raw_get(gw.port, target)
    assert status == 200 and json.loads(body)["path"] == "/healthz"


# --- 4: the bearer scheme is case-insensitive, the key is not ------------------------------------------

@pytest.mark.parametrize("value", [f"bearer {KEY}", f"BEARER {KEY}", f"bEaReR {KEY}", f"Bearer   {KEY}"])
def test_bearer_scheme_in_any_case_works(gw, upstream, value):
    rid = "bearer-" + hashlib.sha256(value.encode()).hexdigest()[:12]
    status, _, _ = raw_get(gw.port, "/info", f"Authorization: {value}", f"X-Request-ID: {rid}")
    assert status == 200
    assert upstream.by_request_id(rid)["headers"]["x-forwarded-user"] == KEY_ID


@pytest.mark.parametrize("value", [f"Bearer {KEY.upper()}", f"Bearer {KEY[:-1]}", f"Bearer{KEY}", f"Bear {KEY}",
                                   f"Bearer {KEY} x"])
def test_bearer_key_still_matches_exactly(gw, value):
    assert json_error(raw_get(gw.port, "/info", f"Authorization: {value}")) == "unauthorized"


def test_scheme_spelling_does_not_give_a_key_a_second_rate_limit_bucket(tmp_path, upstream):
    # Each request from another loopback address, so the per-IP limit cannot be what refuses it.
    other = "vbx_" + "fedcba9876543210" * 3
    env = {"BASIC_AUTH_USERS": "", "API_KEYS": f"{KEY},{other}", "RATE_LIMIT_RPS": "1", "RATE_LIMIT_BURST": "0"}
    with start_gateway(tmp_path, f"127.0.0.1:{upstream.port}", env) as g:
        assert raw_get(g.port, "/info", f"Authorization: Bearer {KEY}", source="127.0.0.2")[0] == 200
        again = raw_get(g.port, "/info", f"Authorization: bearer  {KEY}", source="127.0.0.3")
        assert json_error(again) == "rate_limited"
        assert raw_get(g.port, "/info", f"Authorization: Bearer {other}", source="127.0.0.4")[0] == 200


# --- 6: every synthesis route is capped per client -----------------------------------------------------

def concurrent_statuses(url: str, method: str, n: int, headers: dict) -> list:
    barrier, statuses = threading.Barrier(n), []

    def one():
        barrier.wait()
        statuses.append(requests.request(method, url, headers=headers, data="{}", timeout=30).status_code)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(statuses)


@pytest.mark.parametrize("method,path", [("POST", "/tts"), ("POST", "/v1/audio/speech"), ("GET", "/v1/stream")])
def test_each_synthesis_route_is_capped_per_client(gw, method, path):
    headers = {"Authorization": f"Bearer {KEY}", "X-Test-Delay": "1.5", "Content-Type": "application/json"}
    if path == "/v1/stream":
        headers.update({"Upgrade": "websocket", "Connection": "Upgrade"})
    assert concurrent_statuses(gw.url + path, method, STREAMS + 3, headers) == [200] * STREAMS + [429] * 3


def test_reads_are_not_capped_as_streams(gw):
    headers = {"Authorization": f"Bearer {KEY}", "X-Test-Delay": "1"}
    assert concurrent_statuses(gw.url + "/info", "GET", STREAMS + 3, headers) == [200] * (STREAMS + 3)


# --- 7: every error nginx answers itself is JSON -------------------------------------------------------

ERRORS = {
    "garbage request line": (b"NONSENSE\r\n\r\n", 400, "bad_request"),
    "binary request line": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400, "bad_request"),
    "path above the root": (b"GET /../ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "NUL in the path": (b"GET /info%00 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "HTTP/1.1 without Host": (b"GET /info HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "10 kB URI": (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    "20 kB header": (b"GET /info HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n", 400, "bad_request"),
    "Transfer-Encoding gzip": (b"POST /tts HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
                               "not_implemented"),
    "HTTP/2.0 on a plain listener": (b"GET /info HTTP/2.0\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
    "TRACE": (b"TRACE /info HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    "broken chunked body": (f"POST /tts HTTP/1.1\r\nHost: x\r\nAuthorization: {BASIC_TOKEN}\r\n"
                            "Transfer-Encoding: chunked\r\n\r\nzz\r\n".encode(), 400, "bad_request"),
    "an internal error page asked for": (f"GET /__voxbox/error/bad_request HTTP/1.1\r\nHost: x\r\n"
                                         f"Authorization: {BASIC_TOKEN}\r\nConnection: close\r\n\r\n".encode(),
                                         404, "not_found"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_nginx_errors_are_json(gw, case):
    data, status, code = ERRORS[case]
    answer = raw_request(gw.port, data)
    assert answer[0] == status and json_error(answer) == code
    if status == 405:
        assert answer[1]["allow"] == "GET, HEAD, POST, DELETE"


@pytest.mark.parametrize("target", [b"example.com:443", b"/"])
def test_connect_is_refused_as_json(gw, target):
    # nginx refuses CONNECT as a bad request line (1.22, authority form) or with 405 (newer, origin form).
    answer = raw_request(gw.port, b"CONNECT " + target + b" HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert answer[0] in (400, 405) and json_error(answer) in ("bad_request", "method_not_allowed")
    if answer[0] == 405:
        assert answer[1]["allow"]


def test_http09_request_gets_a_json_body(gw):
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"GET /info\r\n")
        body = b""
        while chunk := s.recv(65536):
            body += chunk
    assert json.loads(body)["error"]["code"] == "unauthorized"  # HTTP/0.9 has no headers: the body alone


# --- issue 13, 3: a worker name is re-resolved; the health listener checks nginx only ---------------------

def loopback_pair_port() -> int:
    """A port free on both 127.0.0.1 and 127.0.0.2: two 'containers' of one service listen on the same port."""
    for _ in range(20):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.2", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


def served_by(g) -> str:
    r = requests.get(f"{g.url}/info", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    return r.json().get("served_by") or r.json()["error"]["code"]


def test_worker_on_a_new_address_is_reached_again_without_a_reload(tmp_path):
    name = "tts.voxbox.test"
    port = loopback_pair_port()
    with recording_server("old", "127.0.0.1", port) as old, recording_server("new", "127.0.0.2", port), \
            dns_server(name, "127.0.0.1") as dns:
        env = {**CREDS, "RESOLVER": f"127.0.0.1:{dns.port}"}
        with start_gateway(tmp_path, f"{name}:{port}", env) as g:
            assert served_by(g) == "old"
            pid_before = (g.prefix / "nginx.pid").read_text()
            # `docker stop tts; docker start tts`: the name is gone for a while, then points elsewhere.
            old.stop()
            dns.address = None
            assert served_by(g) == "worker_unavailable"
            assert requests.get(f"http://127.0.0.1:{g.health_port}/", timeout=5).status_code == 200
            dns.address = "127.0.0.2"
            t0, seen = time.monotonic(), []
            while time.monotonic() - t0 < 15 and (not seen or seen[-1] != "new"):
                seen.append(served_by(g))
                time.sleep(0.25)
            assert seen[-1] == "new", seen
            assert time.monotonic() - t0 < 8  # the resolver's valid=5s, not the record's TTL or a reload
            assert set(seen) <= {"worker_unavailable", "new"}, seen
            assert (g.prefix / "nginx.pid").read_text() == pid_before  # the same nginx, never reloaded
            assert dns.queries >= 2
            health_port = g.health_port
        assert not port_open(health_port)  # nginx gone: the health check fails


def test_health_listener_answers_while_the_worker_is_down(tmp_path):
    with start_gateway(tmp_path, f"127.0.0.1:{free_port()}", CREDS) as g:
        assert json_error(raw_get(g.port, "/healthz")) == "worker_unavailable"
        r = requests.get(f"http://127.0.0.1:{g.health_port}/", timeout=5)
        assert r.status_code == 200 and r.json()["status"] == "ok"


def test_reload_from_inside_the_container_rerenders_and_keeps_the_master(tmp_path, upstream):
    """What rollout.sh runs through `docker compose exec` instead of a HUP from outside (moby#41302)."""
    keys, new = tmp_path / "keys", "vbx_" + "a1b2c3d4e5f60718" * 3
    keys.write_text(KEY + "\n")
    env = {"BASIC_AUTH_USERS": "", "API_KEYS": "", "API_KEYS_FILE": str(keys)}
    with start_gateway(tmp_path, f"127.0.0.1:{upstream.port}", env) as g:
        assert json_error(raw_get(g.port, "/info", f"Authorization: Bearer {new}")) == "unauthorized"
        pid = (g.prefix / "nginx.pid").read_text()
        keys.write_text(f"{KEY}\n{new}\n")
        r = g.reload()
        assert r.returncode == 0 and "2 API key(s)" in r.stderr, r.stderr
        wait_until(lambda: raw_get(g.port, "/info", f"Authorization: Bearer {new}")[0] == 200, 10,
                   "the new key accepted after the reload")
        assert (g.prefix / "nginx.pid").read_text() == pid


# --- render.sh: where the resolver comes from, what it refuses ----------------------------------------------

def rendered(tmp_path, upstream: str, extra: dict, mode: str = "--test"):
    r = render(tmp_path / "ngx", upstream, free_port(), {**CREDS, **extra}, mode=mode)
    upstream_conf = tmp_path / "ngx" / "generated" / "upstream.conf"
    return r, (upstream_conf.read_text() if upstream_conf.exists() else "")


def test_resolver_comes_from_resolv_conf(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example\nnameserver 127.0.0.11\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\n")
    r, upstream_conf = rendered(tmp_path, "tts:8000", {"RESOLV_CONF": str(conf)})
    assert r.returncode == 0, r.stderr  # the name need not resolve when nginx starts
    assert "resolver 127.0.0.11 [2001:db8::53] valid=5s;" in upstream_conf and "upstream" not in upstream_conf


def test_resolver_override_and_address_upstreams(tmp_path):
    r, upstream_conf = rendered(tmp_path / "a", "tts:8000", {"RESOLVER": "10.0.0.2:5353 [::1]"})
    assert r.returncode == 0 and "resolver 10.0.0.2:5353 [::1] valid=5s;" in upstream_conf
    for address in ("127.0.0.1:8000", "[::1]:8000"):
        r, upstream_conf = rendered(tmp_path / address.replace(":", "_"), address, {})
        assert r.returncode == 0, r.stderr
        assert "keepalive 32;" in upstream_conf and "resolver" not in upstream_conf  # an address keeps keepalive
    r, upstream_conf = rendered(tmp_path / "off", "localhost:8000", {"RESOLVER": "off"})
    assert r.returncode == 0, r.stderr
    assert "server localhost:8000 max_fails=1 fail_timeout=2s;" in upstream_conf and "resolver" not in upstream_conf


@pytest.mark.parametrize("extra,message", [
    ({"RESOLV_CONF": "/nonexistent"}, "set RESOLVER"),
    ({"RESOLVER": "10.0.0.2; include /etc/passwd"}, "RESOLVER="),
    ({"GATEWAY_HEALTH_LISTEN": "6007"}, "GATEWAY_HEALTH_LISTEN='6007' must be a loopback address:port"),
])
def test_render_refuses_what_cannot_work(tmp_path, extra, message):
    r, _ = rendered(tmp_path, "tts:8000", extra, mode="--render-only")
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_health_listener_can_be_switched_off(tmp_path):
    r, _ = rendered(tmp_path, "127.0.0.1:8000", {"GATEWAY_HEALTH_LISTEN": "off"})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ngx" / "generated" / "health_server.conf").read_text() == ""
