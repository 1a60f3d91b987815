"""The gateway over several workers (issue 16, 2), with real nginx in front of recording upstreams on loopback:
an address list is spread by least connections, a name with several addresses (a scaled Compose service, a
Kubernetes headless Service) over all of them; synthesis is retried on another worker when one refuses the
connection or answers 503, voice uploads and deletes never are."""
from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import Counter

import requests

from .support.gateway import start_gateway
from .support.procs import free_port, loopback_port, read_head, wait_until
from .support.upstream import dns_server, recording_server

KEY = "vbx_" + "fedcba9876543210" * 3
AUTH = {"Authorization": f"Bearer {KEY}"}
# Rate limits out of the way: these tests send bursts from one client.
ENV = {"API_KEYS": KEY, "RATE_LIMIT_RPS": "1000", "RATE_LIMIT_BURST": "1000", "MAX_STREAMS_PER_CLIENT": "100"}


def call(g, method: str, path: str, **kw) -> tuple[str, requests.Response]:
    rid = uuid.uuid4().hex
    r = requests.request(method, f"{g.url}{path}", headers={**AUTH, "X-Request-ID": rid, **kw.pop("headers", {})},
                         timeout=30, **kw)
    return rid, r


def seen_ids(server) -> list[str]:
    with server.lock:
        return [s["headers"].get("x-request-id") for s in server.seen]


def test_address_list_is_spread_by_least_connections(tmp_path):
    with recording_server("a") as a, recording_server("b") as b, recording_server("c") as c:
        servers = {"a": a, "b": b, "c": c}
        upstream = ",".join(f"127.0.0.1:{s.port}" for s in servers.values())
        with start_gateway(tmp_path, upstream, ENV) as g:
            assert "3 addresses, least_conn" in g.log.read_text()
            counts = Counter(call(g, "GET", "/info")[1].json()["served_by"] for _ in range(30))
            assert set(counts) == set(servers) and min(counts.values()) >= 8, counts  # ties: round robin

            # A long synthesis holds one worker: while it runs, new requests go to the others.
            slow = threading.Thread(target=call, args=(g, "POST", "/tts"), kwargs={"json": {"text": "long"},
                                    "headers": {"X-Test-Delay": "3"}})
            slow.start()
            wait_until(lambda: any(s.seen and s.seen[-1]["path"] == "/tts" for s in servers.values()), 5,
                       "the slow request to reach a worker")
            busy = next(n for n, s in servers.items() if s.seen[-1]["path"] == "/tts")
            during = Counter(call(g, "GET", "/info")[1].json()["served_by"] for _ in range(12))
            slow.join()
            assert busy not in during and sum(during.values()) == 12, (busy, during)


def test_synthesis_is_retried_on_another_worker_after_503_or_a_refused_connection(tmp_path):
    dead = free_port()  # nothing listens: the connection is refused before any byte is sent
    with recording_server("full") as full, recording_server("ok") as ok:
        full.status = 503
        upstream = f"127.0.0.1:{full.port},127.0.0.1:{dead},127.0.0.1:{ok.port}"
        with start_gateway(tmp_path, upstream, ENV) as g:
            results = []
            for i in range(24):
                path = ("/tts", "/v1/audio/speech")[i % 2]
                results.append(call(g, "POST", path, json={"text": "hello", "input": "hello"}))
                if i == 11:
                    time.sleep(2.2)  # past fail_timeout: the full worker is tried again
            assert [r.status_code for _, r in results] == [200] * 24, [r.text for _, r in results if r.status_code != 200]
            assert {r.json()["served_by"] for _, r in results} == {"ok"}
            retried = set(seen_ids(full))
            # The full worker did see requests (it was asked, not skipped), and each of those was served by another.
            assert retried and retried <= set(seen_ids(ok)), (retried, seen_ids(ok))
            # A WebSocket handshake is a GET with no side effects either.
            _, r = call(g, "GET", "/v1/stream")
            assert r.status_code == 200 and r.json()["served_by"] == "ok"


def test_readiness_through_the_gateway_asks_another_worker_when_one_is_draining(tmp_path):
    """A rollout's old worker answers /readyz 503 while it drains; the service is still ready."""
    with recording_server("draining") as draining, recording_server("ok") as ok:
        draining.status = 503
        upstream = f"127.0.0.1:{draining.port},127.0.0.1:{ok.port}"
        with start_gateway(tmp_path, upstream, ENV) as g:
            results = [call(g, "GET", "/readyz")[1] for _ in range(8)]
            assert [r.status_code for r in results] == [200] * 8 and {r.json()["served_by"] for r in results} == {"ok"}
            assert draining.seen and all(req["path"] == "/readyz" for req in draining.seen)  # asked, then passed over
        with start_gateway(tmp_path / "alone", f"127.0.0.1:{draining.port}", ENV) as g:
            assert call(g, "GET", "/readyz")[1].status_code == 503  # the only worker: its answer stands


def test_voice_uploads_and_deletes_are_never_repeated_on_another_worker(tmp_path):
    dead = free_port()
    with recording_server("full") as full, recording_server("ok") as ok:
        full.status = 503
        upstream = f"127.0.0.1:{full.port},127.0.0.1:{dead},127.0.0.1:{ok.port}"
        with start_gateway(tmp_path, upstream, ENV) as g:
            answers = {}

            def unsent() -> list[str]:
                return [rid for rid, r in answers.items() if rid not in seen_ids(full) + seen_ids(ok)]

            deadline = time.monotonic() + 20
            # Until both the full and the dead worker have been picked twice (after a failure each sits out
            # fail_timeout=2s).
            while (len(seen_ids(full)) < 2 or len(unsent()) < 2) and time.monotonic() < deadline:
                rid, r = call(g, "POST", "/v1/voices", files={"file": ("a.wav", b"RIFF" + b"\0" * 64)},
                              data={"name": "n", "text": "t"})
                answers[rid] = r
                rid, r = call(g, "DELETE", "/v1/voices/v_123")
                answers[rid] = r
                time.sleep(0.3)
            at_full, at_ok = seen_ids(full), seen_ids(ok)
            assert len(at_full) >= 2 and len(unsent()) >= 2, "the full and the dead worker were not both picked"
            for rid, r in answers.items():
                assert (rid in at_full) + (rid in at_ok) <= 1, f"{rid} was sent to two workers"
                if rid in at_full:  # the worker's own 503 comes back, not a retry elsewhere
                    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
                    assert r.headers["Retry-After"] == "2"
                elif rid not in at_ok:  # refused by the dead one: the client is told to retry, nginx does not
                    assert r.status_code == 503 and r.json()["error"]["code"] == "worker_unavailable"


def test_when_every_worker_is_full_the_client_gets_a_503_with_retry_after(tmp_path):
    with recording_server("a") as a, recording_server("b") as b:
        a.status = b.status = 503
        with start_gateway(tmp_path, f"127.0.0.1:{a.port},127.0.0.1:{b.port}", ENV) as g:
            rid, r = call(g, "POST", "/tts", json={"text": "hello"})
            # Both were tried; the last worker's own answer is passed on.
            assert rid in seen_ids(a) and rid in seen_ids(b)
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full" and r.headers["Retry-After"]
            # Both sit out fail_timeout now: the gateway's own 503 says to come back.
            _, r = call(g, "POST", "/tts", json={"text": "hello"})
            assert r.status_code == 503 and r.headers["Retry-After"]
            assert r.json()["error"]["code"] in ("queue_full", "worker_unavailable")


def test_a_name_with_several_addresses_is_spread_over_all_of_them_and_retried(tmp_path):
    """nginx 1.22 has no re-resolving upstream block: the name is resolved per request through the resolver
    and each request goes to one of its addresses (nginx rotates them at random), retried on the others."""
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    name = "tts.scale.test"
    port = loopback_port(hosts)
    with recording_server("w1", hosts[0], port), recording_server("w2", hosts[1], port) as w2, \
            recording_server("w3", hosts[2], port), dns_server(name, hosts) as dns:
        with start_gateway(tmp_path, f"{name}:{port}", {**ENV, "RESOLVER": f"127.0.0.1:{dns.port}"}) as g:
            counts = Counter(call(g, "GET", "/info")[1].json()["served_by"] for _ in range(60))
            assert set(counts) == {"w1", "w2", "w3"} and min(counts.values()) >= 5, counts

            w2.status = 503
            results = [call(g, "POST", "/tts", json={"text": "hi"}) for _ in range(20)]
            assert [r.status_code for _, r in results] == [200] * 20
            assert {r.json()["served_by"] for _, r in results} <= {"w1", "w3"}
            assert seen_ids(w2), "w2 was never asked: the retry was not exercised"


def test_a_list_of_names_is_refused_saying_what_to_give_instead(tmp_path):
    from .support.gateway import render

    r = render(tmp_path / "p", "tts-1:8000,tts-2:8000", 6006, {**ENV, "RESOLVER": "127.0.0.1"})
    assert r.returncode != 0 and "a list must be IP addresses" in r.stderr and "headless Service" in r.stderr
    r = render(tmp_path / "q", "tts-1:8000,tts-2:8000", 6006, {**ENV, "RESOLVER": "off"})
    assert r.returncode == 0, r.stderr
    conf = (tmp_path / "q" / "generated" / "upstream.conf").read_text()
    assert "server tts-1:8000 max_fails=1" in conf and "server tts-2:8000 max_fails=1" in conf and "least_conn;" in conf


class DyingWorker:
    """A worker that dies on every request: `after_bytes=None` closes the connection before answering,
    otherwise it sends a 200 and the start of a chunked audio stream, then dies mid-stream."""

    def __init__(self, after_bytes: bytes | None):
        self.after_bytes, self.requests = after_bytes, []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = read_head(conn)
                rid = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                            if line.lower().startswith(b"x-request-id:")), None)
                self.requests.append(rid)
                if self.after_bytes is not None:
                    chunk = self.after_bytes
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: audio/pcm\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    time.sleep(0.2)  # the client has the first audio; then the worker dies

    def close(self) -> None:
        self.sock.close()


def test_a_worker_dying_before_it_answers_is_retried_but_mid_stream_only_its_stream_ends(tmp_path):
    with recording_server("ok") as ok:
        before, midway = DyingWorker(None), DyingWorker(b"first-audio")
        try:
            for dying, retried in ((before, True), (midway, False)):
                upstream = f"127.0.0.1:{dying.port},127.0.0.1:{ok.port}"
                with start_gateway(tmp_path / str(dying.port), upstream, ENV) as g:
                    outcomes = []
                    deadline = time.monotonic() + 15
                    while len(dying.requests) < 2 and time.monotonic() < deadline:
                        rid = uuid.uuid4().hex
                        got = b""
                        try:
                            with requests.post(f"{g.url}/v1/audio/speech", json={"input": "hi", "stream": True},
                                               headers={**AUTH, "X-Request-ID": rid}, stream=True, timeout=10) as r:
                                for piece in r.iter_content(None):
                                    got += piece
                            outcomes.append((rid, r.status_code, got, None))
                        except requests.exceptions.RequestException as e:
                            outcomes.append((rid, None, got, e))
                        time.sleep(0.3)
                    assert len(dying.requests) >= 2, "the dying worker was never picked"
                    for rid, status, got, error in outcomes:
                        if rid not in dying.requests:
                            assert status == 200 and b'"served_by": "ok"' in got
                        elif retried:  # nothing reached the client: the request went on to the other worker
                            assert status == 200 and b'"served_by": "ok"' in got and rid in seen_ids(ok)
                        else:  # audio had flowed: this stream ends, cut short, and is never repeated elsewhere
                            assert got == b"first-audio" and error is not None, (got, status, error)
                            assert rid not in seen_ids(ok)
        finally:
            before.close()
            midway.close()
