"""The worker's process life with a real gunicorn: SIGTERM drains (readiness 503 at once, new requests
503 shutting_down, accepted ones finish), and instances on one host share no control socket."""
import json
import os
import signal
import threading
import time

import requests
import websocket

from .support.procs import port_open, wait_until
from .support.worker import SLOW_APP, start_worker, ws_collect


def in_flight(url: str) -> float:
    """Jobs in flight over every model of the worker (the gauge is per model)."""
    values = [float(line.split()[-1]) for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines()
              if line.startswith("voxbox_in_flight{")]
    assert values, "no voxbox_in_flight metric"
    return sum(values)


def test_sigterm_refuses_new_requests_at_once_and_finishes_accepted_ones(tmp_path):
    steps, step_s = 60, 0.05  # one request: 3 s of generation
    env = {"SLOW_STEPS": str(steps), "SLOW_STEP_S": str(step_s), "GRACEFUL_TIMEOUT": "20", "RETRY_AFTER_S": "3"}
    with start_worker(tmp_path, env, app=SLOW_APP) as w:
        accepted = {}
        long = threading.Thread(target=lambda: accepted.update(
            r=requests.post(f"{w.url}/tts", json={"text": "A request already accepted."}, timeout=30)))
        long.start()
        wait_until(lambda: in_flight(w.url) == 1, 10, "the long request running")
        os.kill(w.pid, signal.SIGTERM)  # the gunicorn master, as `docker stop` does; it tells the worker
        t0 = time.monotonic()
        wait_until(lambda: requests.get(f"{w.url}/readyz", timeout=2).status_code == 503, 2, "readiness 503")
        assert time.monotonic() - t0 < 1.0
        ready = requests.get(f"{w.url}/readyz", timeout=2)
        assert ready.json()["status"] == "draining" and ready.headers["Retry-After"] == "3"
        for path, body in (("/tts", {"text": "New."}), ("/v1/audio/speech", {"input": "New.", "response_format": "wav"})):
            with requests.Session() as fresh:  # a new connection: the worker still accepts, and answers at once
                r = fresh.post(f"{w.url}{path}", json=body, timeout=5)
            assert r.status_code == 503 and r.headers["Retry-After"] == "3", r.text
            err = r.json()["error"]
            assert err["code"] == "shutting_down" and "shutting down" in err["message"] and "retry" in err["message"]
            assert r.elapsed.total_seconds() < 0.5
        assert requests.get(f"{w.url}/healthz", timeout=2).status_code == 200  # alive: nothing to restart
        long.join(30)
        r = accepted["r"]
        assert r.status_code == 200 and abs(r.json()["duration"] - steps * 0.05) < 0.2, r.text
        # With nothing in flight the worker stops by itself, well before its grace period.
        wait_until(lambda: not port_open(w.port), 10, "the worker exits once drained", log=w.log)
        assert "drained (no request in flight); stopping" in w.log_text()


def test_sigterm_closes_idle_websockets_so_clients_reconnect_elsewhere(tmp_path):
    """An open WebSocket holds a thread; at shutdown an idle one is closed with 1001 (going away) at once
    instead of keeping the worker up for its whole grace period, and new handshakes get 503."""
    with start_worker(tmp_path, {"GRACEFUL_TIMEOUT": "20"}, app=SLOW_APP) as w:
        ws = websocket.create_connection(w.ws_url, timeout=10)
        ws.send(json.dumps({"text": "Before the shutdown."}))
        assert ws_collect(ws)[2]["type"] == "done"
        t0 = time.monotonic()
        os.kill(w.pid, signal.SIGTERM)
        opcode, frame = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(frame[:2], "big") == 1001, (opcode, frame)
        assert time.monotonic() - t0 < 3
        wait_until(lambda: not port_open(w.port), 10, "the worker exits, not held up by the socket", log=w.log)
        assert time.monotonic() - t0 < 10


def test_two_instances_share_no_control_socket(tmp_path):
    """gunicorn's control socket would be one path per user (~/.gunicorn/gunicorn.ctl): each start
    replaced another instance's and each stop deleted it. It is off."""
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": ""}
    with start_worker(tmp_path / "a", env, app=SLOW_APP) as a:
        with start_worker(tmp_path / "b", env, app=SLOW_APP) as b:
            assert list(home.rglob("*")) == []  # no socket, no ~/.gunicorn directory
            assert requests.get(f"{b.url}/readyz", timeout=5).status_code == 200
        assert requests.get(f"{a.url}/readyz", timeout=5).status_code == 200  # b's stop left a alone
    for w in (a, b):
        assert "control socket" not in w.log_text().lower(), w.log_text()[-2000:]
