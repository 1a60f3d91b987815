"""Scale-out, natively (issue 16): three real gunicorn workers on the real VoxCPM-1.5 model code (a tiny
random checkpoint, so they clone voices), each on a loopback address of its own and one shared port, found
by the real nginx gateway through one DNS name (as a `docker compose --scale` service or a Kubernetes headless
Service is), with voices on SeaweedFS (VOICES_URI). Which worker served a request is its X-Served-By header.

Workers join and leave the service by the name's DNS answer, as they do under Compose and Kubernetes; the
gateway re-resolves it every 5 s. The module's tests share one set of workers; each first brings the set
to what it needs, so any one of them runs alone too.
"""
from __future__ import annotations

import io
import json
import os
import signal
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families

from .support.gateway import start_gateway
from .support.load import Outcome, SpeechLoad
from .support.procs import loopback_port, wait_until
from .support.upstream import dns_server
from .support.voxcpm_checkpoint import build_checkpoint
from .support.worker import Worker, start_worker

pytest_plugins = ["tests.support.s3"]

KEY = "vbx_" + "0a1b2c3d4e5f6789" * 3
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tts.scale-out.test"
HOSTS = {"w1": "127.0.0.1", "w2": "127.0.0.2", "w3": "127.0.0.3"}
# The gateway caches the name's addresses this long (render.sh: resolver valid=5s), plus a margin.
RESOLVE_S = 6.0


def worker_env(checkpoint: Path, voices_uri: str, s3_env: dict) -> dict:
    # One inference thread per worker at batch 1 (CPU), OMP_NUM_THREADS=1: three workers share two cores.
    return {"TTS_ENGINE": "voxcpm", "MODEL_DIR": str(checkpoint), "TTS_DEVICE": "cpu", "TTS_MAX_BATCH": "1",
            "QUEUE_SIZE": "8", "VOXCPM_MAX_LEN": "16", "VOXCPM_INFERENCE_TIMESTEPS": "2", "CROSSFADE_MS": "0",
            "OMP_NUM_THREADS": "1", "GRACEFUL_TIMEOUT": "20", "VOICES_URI": voices_uri, **s3_env}


class Cluster:
    """The workers behind the gateway: started, stopped and killed by name; `listed` is who the DNS names."""

    def __init__(self, tmp: Path, env: dict, port: int, dns):
        self.tmp, self.env, self.port, self.dns = tmp, env, port, dns
        self.workers: dict[str, tuple[ExitStack, Worker]] = {}

    @property
    def listed(self) -> list[str]:
        return sorted(n for n, h in HOSTS.items() if h in (self.dns.address or []))

    def list(self, names: list[str]) -> None:
        """The name now resolves to these workers; returns once the gateway has re-resolved it."""
        if sorted(names) != self.listed:
            self.dns.address = [HOSTS[n] for n in sorted(names)]
            time.sleep(RESOLVE_S)

    def start(self, *names: str) -> None:
        def one(name: str) -> None:
            stack = ExitStack()
            w = stack.enter_context(start_worker(
                self.tmp / name, {**self.env, "WORKER_NAME": name, "VOICES_DIR": str(self.tmp / name / "voices")},
                host=HOSTS[name], port=self.port))
            self.workers[name] = (stack, w)

        with ThreadPoolExecutor(len(names)) as pool:
            list(pool.map(one, names))

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        stack, w = self.workers.pop(name)
        if sig != signal.SIGTERM:
            os.killpg(w.pid, sig)
        stack.close()  # SIGTERM: gunicorn drains (accepted requests finish), then exits

    def ensure(self, names: list[str]) -> None:
        """Exactly these workers running and listed (a worker leaves the name before it stops, as a
        Kubernetes pod leaves its Service's endpoints)."""
        missing = [n for n in names if n not in self.workers]
        if missing:
            self.start(*missing)
        self.list(names)
        for gone in set(self.workers) - set(names):
            self.stop(gone)

    def worker(self, name: str) -> Worker:
        return self.workers[name][1]

    def close(self) -> None:
        for name in list(self.workers):
            self.stop(name, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale-out")
    checkpoint = build_checkpoint(tmp / "voxcpm-tiny", size="tiny", seed=0)
    bucket = f"voices-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)
    port = loopback_port(list(HOSTS.values()))
    env = worker_env(checkpoint, f"s3://{bucket}/voices/", s3_server.env())
    with dns_server(NAME, []) as dns:
        c = Cluster(tmp, env, port, dns)
        try:
            gw_env = {"API_KEYS": KEY, "RESOLVER": f"127.0.0.1:{dns.port}", "RATE_LIMIT_RPS": "1000",
                      "RATE_LIMIT_BURST": "1000", "MAX_STREAMS_PER_CLIENT": "100"}
            with start_gateway(tmp, f"{NAME}:{port}", gw_env) as gw:
                c.gateway = gw
                yield c
        finally:
            c.close()


def queue_wait(worker: Worker) -> tuple[float, float]:
    """The worker's total queue wait (seconds) and the number of jobs it measured (its histogram)."""
    total = count = 0.0
    for family in text_string_to_metric_families(requests.get(f"{worker.url}/metrics", timeout=10).text):
        if family.name == "voxbox_queue_wait_seconds":
            for s in family.samples:
                total += s.value if s.name.endswith("_sum") else 0.0
                count += s.value if s.name.endswith("_count") else 0.0
    return total, count


def clip(seconds: float = 3.0, rate: int = 22050) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 170 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32),
             rate, format="WAV")
    return buf.getvalue()


def upstream_of(gateway, rid: str) -> str:
    """The worker address the gateway's access log gives for a request (the last one tried)."""
    def logged() -> list[str]:
        return [line for line in gateway.log_text().splitlines() if f'"request_id":"{rid}"' in line]

    # nginx writes the line once the response is sent: the client may read it a moment earlier.
    wait_until(lambda: logged(), 10, f"request {rid} in the gateway's access log", log=gateway.log)
    return json.loads(logged()[0])["upstream_addr"].split(", ")[-1]


# -- the tests ----------------------------------------------------------------------------------
def test_a_voice_uploaded_through_the_gateway_is_used_by_every_worker(cluster):
    cluster.ensure(["w1", "w2", "w3"])
    gw = cluster.gateway
    r = requests.post(f"{gw.url}/v1/voices", headers=AUTH, timeout=60, data={"name": "Shared", "text": "Hello there."},
                      files={"file": ("ref.wav", clip(), "audio/wav")})
    assert r.status_code == 201, r.text
    voice, uploaded_on = r.json()["id"], r.headers["X-Served-By"]

    load = SpeechLoad(gw.url, 0, AUTH)
    by_worker: dict[str, list[Outcome]] = {}
    for _ in range(60):  # the gateway picks a worker at random per request: until all three served it
        out = load.one(stream=False, voice=voice, seed=5)
        assert out.ok, out
        by_worker.setdefault(out.served_by, []).append(out)
        if len(by_worker) == 3:
            break
    assert sorted(by_worker) == ["w1", "w2", "w3"], {k: len(v) for k, v in by_worker.items()}
    # The header names the worker the gateway's access log says it sent the request to.
    for name, outs in by_worker.items():
        assert upstream_of(gw, outs[0].rid) == f"{HOSTS[name]}:{cluster.port}"

    # Same seed, same voice: every worker makes the same audio, and it is not the model's own voice.
    def audio(name: str, **body) -> bytes:
        r = requests.post(f"{cluster.worker(name).url}/v1/audio/speech", timeout=60, json={
            "input": "Steady load.", "response_format": "pcm", "max_len": 6, "seed": 5, **body})
        assert r.status_code == 200, r.text
        return r.content

    cloned = {name: audio(name, voice=voice) for name in HOSTS}
    assert len(set(cloned.values())) == 1, "the workers made different audio from one voice and seed"
    assert audio("w1") != cloned["w1"], "the voice made no difference: it was not used"
    print(f"\nvoice uploaded on {uploaded_on}; served with it by {({k: len(v) for k, v in by_worker.items()})}")

    r = requests.delete(f"{gw.url}/v1/voices/{voice}", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    for name in HOSTS:  # deleted through whichever worker took the delete: gone on all
        r = requests.get(f"{cluster.worker(name).url}/v1/voices/{voice}", timeout=10)
        assert r.status_code == 404, (name, r.text)


def test_adding_a_worker_spreads_the_load_onto_it_and_queue_waits_fall(cluster):
    """Raw throughput is no measure on two CPU cores shared with other work: the model is CPU-bound, so what
    a third worker adds depends on what else the cores run (on GPU hosts each worker brings its own GPU). It
    is printed, not asserted. What scaling out must do regardless: the new worker takes its share of the
    requests, and requests wait less in the workers' queues (the same clients spread over more queues; even
    at the same total rate, more of a request's time is spent being synthesised, less waiting its turn)."""
    cluster.ensure(["w1", "w2"])
    clients, phase_s = 4, 10.0

    def measure(names: list[str]) -> tuple[list[Outcome], float, float]:
        before = {n: queue_wait(cluster.worker(n)) for n in names}
        t0 = time.monotonic()
        time.sleep(phase_s)
        t1 = time.monotonic()
        after = {n: queue_wait(cluster.worker(n)) for n in names}
        waited = sum(after[n][0] - before[n][0] for n in names)
        jobs = sum(after[n][1] - before[n][1] for n in names)
        return load.between(t0, t1), waited / max(jobs, 1), t1 - t0

    with SpeechLoad(cluster.gateway.url, clients, AUTH) as load:
        time.sleep(1)
        two, wait_two, span_two = measure(["w1", "w2"])
        cluster.start("w3")
        cluster.list(["w1", "w2", "w3"])
        three, wait_three, span_three = measure(["w1", "w2", "w3"])
    for outs in (two, three):
        assert outs and all(o.ok for o in outs), [o for o in outs if not o.ok][:5]
    spread_two, spread_three = Counter(o.served_by for o in two), Counter(o.served_by for o in three)
    print(f"\n2 workers: {len(two) / span_two:.1f} req/s, mean queue wait {wait_two * 1000:.0f} ms, {dict(spread_two)}"
          f"\n3 workers: {len(three) / span_three:.1f} req/s, mean queue wait {wait_three * 1000:.0f} ms, "
          f"{dict(spread_three)}")
    assert set(spread_two) == {"w1", "w2"}
    assert set(spread_three) == {"w1", "w2", "w3"} and spread_three["w3"] >= len(three) / 6, spread_three
    assert wait_three < 0.85 * wait_two, (wait_two, wait_three)


def test_killing_a_worker_under_load_costs_only_the_streams_it_was_sending(cluster):
    """SIGKILL, no drain, while it sends a stream. A request it had not answered yet is retried on another
    worker by the gateway (synthesis has no side effects); only streams whose audio had started flowing
    from it end early."""
    cluster.ensure(["w1", "w2", "w3"])
    with SpeechLoad(cluster.gateway.url, 4, AUTH, max_len=16) as load:
        time.sleep(2)
        cut = load.streaming(30)
        victim = cut.served_by
        killing = time.monotonic()
        cluster.stop(victim, signal.SIGKILL)
        killed_at = time.monotonic()  # dead by now
        time.sleep(3)  # its address is still listed: the gateway meets refused connections and goes elsewhere
        left = sorted(set(HOSTS) - {victim})
        cluster.list(left)  # as Compose / Kubernetes drop a dead replica's address
        time.sleep(1)
    outcomes = load.outcomes
    failed = [o for o in outcomes if not o.ok]
    print(f"\nkilled {victim}: {len(outcomes)} requests, {len(failed)} failed: "
          f"{[(o.served_by, o.streamed, o.error) for o in failed]}")
    assert cut.ended < killed_at or not cut.ok, "a stream outlived the worker sending it"
    for o in failed:
        assert o.served_by == victim and o.streamed and o.status == 200, o
        assert o.started < killed_at and o.ended > killing, o
    assert len(failed) <= 4  # at most one per client: those in flight on the victim
    after = [o for o in outcomes if o.started > killed_at]
    assert len(after) >= 4 and all(o.ok for o in after) and {o.served_by for o in after} <= set(left)


def test_restarting_every_worker_one_by_one_under_load_loses_no_request(cluster):
    """A rolling restart: each worker in turn gets SIGTERM (it answers 503 shutting_down to what arrives,
    which the gateway retries elsewhere, and finishes what it accepted), exits, and comes back."""
    cluster.ensure(["w1", "w2", "w3"])
    back: dict[str, float] = {}
    with SpeechLoad(cluster.gateway.url, 4, AUTH, max_len=16) as load:
        time.sleep(2)
        t0 = time.monotonic()
        for name in ("w1", "w2", "w3"):
            cluster.stop(name)
            cluster.start(name)
            back[name] = time.monotonic()
        time.sleep(4)
    outcomes = load.outcomes
    failed = [o for o in outcomes if not o.ok]
    print(f"\nrolling restart in {back['w3'] - t0:.1f}s: {len(outcomes)} requests, "
          f"{dict(Counter(o.served_by for o in outcomes))}, failed {len(failed)}")
    assert not failed, failed[:5]
    for name, ready in back.items():
        assert any(o.served_by == name and o.started > ready for o in outcomes), f"{name} served nothing after it came back"
