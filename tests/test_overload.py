"""Overload: a real gunicorn worker (timed fake engine, tests/support/slow_engine.py) behind real nginx,
driven at twice what it can hold. What is beyond queue + batch is refused at once, health checks never
wait behind synthesis, accepted requests' latency stays bounded, memory stays flat.

This holds by construction (Settings.batch_capacity): the worker runs with the fewest threads its
start-up check allows, GUNICORN_THREADS = QUEUE_SIZE + TTS_MAX_BATCH + WS_MAX_CONNECTIONS + 4.
"""
import math
import threading
import time
from pathlib import Path

import pytest
import requests

from .support.gateway import start_gateway
from .support.worker import SLOW_APP, start_worker

QUEUE, BATCH = 4, 2
THREADS = QUEUE + BATCH + 1 + 4  # WS_MAX_CONNECTIONS auto = threads / 8 = 1; 4 kept for health checks
STEP_S, STEPS = 0.05, 10
REQUEST_S = STEP_S * STEPS  # one request alone
CLIENTS = 2 * (QUEUE + BATCH)  # twice what the worker holds at once
LOAD_S = 6.0
FAST = 0.1  # the promise: refusals and health answers within 100 ms
KEY = "vbx_" + "fedcba9876543210" * 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    env = {"GUNICORN_THREADS": str(THREADS), "QUEUE_SIZE": str(QUEUE), "TTS_MAX_BATCH": str(BATCH),
           "RETRY_AFTER_S": "1", "SLOW_STEP_S": str(STEP_S), "SLOW_STEPS": str(STEPS)}
    tmp = tmp_path_factory.mktemp("overload")
    with start_worker(tmp / "w", env, app=SLOW_APP) as w, \
            start_gateway(tmp / "gw", f"127.0.0.1:{w.port}", {
                "API_KEYS": KEY, "RATE_LIMIT_RPS": "500", "RATE_LIMIT_BURST": "500"}) as gw:  # probes, not limits
        yield w, gw


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_twice_the_capacity_is_shed_at_once_and_health_never_waits(stack):
    worker, gw = stack
    info = requests.get(f"{worker.url}/info", timeout=5).json()
    assert info["limits"]["batch_size"] == BATCH and info["limits"]["queue_size"] == QUEUE
    pid = worker.worker_pid()
    end = time.monotonic() + LOAD_S
    answers, probes, rss = [], [], []  # list.append is atomic: the threads share them without a lock

    def client():
        with requests.Session() as s:
            while time.monotonic() < end:
                t0 = time.monotonic()
                r = s.post(f"{worker.url}/tts", json={"text": "Load."}, timeout=30)
                answers.append((r.status_code, time.monotonic() - t0, r.headers.get("Retry-After"),
                                r.json().get("error", {}).get("code")))
                if r.status_code == 503:  # as the OpenAI SDK does: back off as told
                    time.sleep(float(r.headers["Retry-After"]))

    def prober():
        targets = [(f"{worker.url}/healthz", {}), (f"{worker.url}/readyz", {}), (f"{gw.url}/healthz", {}),
                   (f"{gw.url}/readyz", {"Authorization": f"Bearer {KEY}"})]
        sessions = [requests.Session() for _ in targets]
        i = 0
        while time.monotonic() < end:
            url, headers = targets[i % len(targets)]
            t0 = time.monotonic()
            status = sessions[i % len(targets)].get(url, headers=headers, timeout=10).status_code
            probes.append((url, status, time.monotonic() - t0))
            rss.append(rss_bytes(pid))
            i += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)] + [threading.Thread(target=prober)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    served = [a for a in answers if a[0] == 200]
    shed = [a for a in answers if a[0] == 503]
    assert {a[0] for a in answers} <= {200, 503}, answers
    # The worker ran at capacity (BATCH requests per REQUEST_S) and refused the rest.
    assert len(served) >= 0.5 * LOAD_S / REQUEST_S * BATCH and shed, (len(served), len(shed))
    slowest_refusal = max(a[1] for a in shed)
    assert slowest_refusal < FAST, f"a 503 took {slowest_refusal * 1000:.0f} ms"
    assert all(a[2] == "1" and a[3] == "overloaded" for a in shed)
    # An accepted request waits at most for the batch running now and the queue ahead of it.
    bound = (math.ceil(QUEUE / BATCH) + 1) * REQUEST_S + 2 * STEP_S + 0.5
    slowest_served = max(a[1] for a in served)
    assert slowest_served < bound, f"an accepted request took {slowest_served:.2f}s (bound {bound:.2f}s)"
    assert len(probes) > 40 and all(p[1] == 200 for p in probes), [p for p in probes if p[1] != 200]
    slowest_probe = max(probes, key=lambda p: p[2])
    assert slowest_probe[2] < FAST, f"{slowest_probe[0]} took {slowest_probe[2] * 1000:.0f} ms under load"
    metrics = requests.get(f"{worker.url}/metrics", timeout=5).text
    assert f'voxbox_rejected_total{{model="embedded"}} {float(len(shed))}' in metrics
    # Memory: flat from the first half of the run to the second (no per-request growth).
    half = len(rss) // 2
    assert max(rss[half:]) - max(rss[:half]) < 16 * 2**20, (max(rss[:half]), max(rss[half:]))
    print(f"\noverload: {len(served)} served (slowest {slowest_served:.2f}s, bound {bound:.2f}s), {len(shed)} shed "
          f"(slowest {slowest_refusal * 1000:.0f} ms), {len(probes)} health probes (slowest "
          f"{slowest_probe[2] * 1000:.0f} ms), RSS {max(rss[:half]) / 2**20:.1f} -> {max(rss[half:]) / 2**20:.1f} MiB")
