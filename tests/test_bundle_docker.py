"""The real bundle: both images built from docker/*.Dockerfile, `docker compose up` under a real Docker
engine (CPU variant, local-s3 profile), requests through the gateway, restarts and rollouts.

The tests in this module run in order on one Compose project (each leaves the bundle serving on a
known tag for the next); they take minutes, most of it waiting for Docker's 15 s health checks.
Base images cannot be pulled here, so tests/support/docker_bundle.py builds stand-ins under the same
names (once; reused from the engine's store). Needs root (to start dockerd when none runs).
"""
from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
import uuid
from collections import Counter

import numpy as np
import pytest
import requests
import soundfile as sf
import websocket

from .support import docker_bundle as db
from .support.load import SpeechLoad
from .support.procs import REPO_ROOT, free_port
from .support.voxcpm_checkpoint import build_checkpoint
from .support.worker import ws_collect

USER, PASSWORD = "tester", "bundle-pass-1"
API_KEY = "vbx_" + "b" * 40
MODEL_URI = "s3://models/voxcpm-1.5/v1/"
S3_KEY, S3_SECRET = "voxbox-bundle", "voxbox-bundle-secret"
OLD, NEW = "1.0.0", "1.0.1"


@pytest.fixture(scope="module")
def engine():
    env = db.docker_env()
    try:
        db.ensure_engine(env)
    except PermissionError as e:
        pytest.skip(f"the bundle tests need a Docker engine: {e} (run `make test` as root)")
    except db.DockerUnavailable as e:
        pytest.fail(f"Docker cannot run here, so the bundle cannot be tested: {e}")
    # One bundle run per machine at a time: these tests restart the shared dockerd.
    with db.machine_lock("bundle", timeout=3600):
        t0 = time.monotonic()
        built = db.build_standins(env)
        print(f"\nstand-in bases ready in {time.monotonic() - t0:.0f}s: {built or 'all reused'}")
        yield env


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = db.start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def images(engine, registry):
    """Both product images, as OLD and NEW (same sources, new VERSION), pushed to the local registry."""
    out = {}
    for tag in (OLD, NEW):
        for which in ("worker", "gateway"):
            # Built under a fixed name, which keeps the build cache between runs (the registry's port,
            # part of the pushed name, changes every run); the pushed name is only a tag of it.
            local = f"voxbox-test/voxbox-{which}:{tag}"
            built = db.build_product(engine, which, local, tag, revision=f"test-{tag}")
            image = f"{registry.host}/voxbox/voxbox-{which}:{tag}"
            db.docker(engine, "tag", local, image)
            t0 = time.monotonic()
            db.docker(engine, "push", image, timeout=1800)
            print(f"built {image}: {built.seconds:.1f}s, {built.size_mb:.0f} MB; "
                  f"pushed in {time.monotonic() - t0:.1f}s")
            out[(which, tag)] = image
    yield out
    for image in out.values():
        db.docker(engine, "rmi", image, check=False)


def _http(project: db.Project) -> str:
    return f"http://127.0.0.1:{project.settings['GATEWAY_PORT']}"


AUTH = {"Authorization": db.basic_auth(USER, PASSWORD)}
BEARER = {"Authorization": f"Bearer {API_KEY}"}


def wait_for(check, timeout: float, what: str, project: db.Project | None = None, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except Exception as e:  # noqa: BLE001 - anything that is not ready yet
            last = e
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last error: {last})\n"
                         + (project.logs() if project else ""))


def gateway_ready(project: db.Project) -> bool:
    return requests.get(f"{_http(project)}/readyz", headers=AUTH, timeout=5).status_code == 200


def s3_client(project: db.Project):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{project.settings['LOCAL_S3_PORT']}",
                        aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


@pytest.fixture(scope="module")
def project(engine, images, registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    name = f"voxboxtest{uuid.uuid4().hex[:8]}"
    p = db.make_project(tmp, engine, name)
    p.write_env(
        VOXBOX_TAG=OLD, REGISTRY=f"{registry.host}/voxbox", GATEWAY_PORT=str(free_port()),
        LOCAL_S3_PORT=str(free_port()), LOCAL_S3_CONSOLE_PORT=str(free_port()),
        AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET, MODEL_URI=MODEL_URI,
        S3_ENDPOINT_URL="http://local-s3:9000", S3_ADDRESSING_STYLE="path",
        BASIC_AUTH_USERS=f"{USER}:{PASSWORD}", API_KEYS=API_KEY,
        # The load during rollouts is one client: keep the gateway's per-client limits out of its way.
        RATE_LIMIT_RPS="1000", RATE_LIMIT_BURST="1000", MAX_STREAMS_PER_CLIENT="16",
        # A tiny random checkpoint on 2 CPU cores: short generations, few diffusion steps.
        VOXCPM_MAX_LEN="24", VOXCPM_INFERENCE_TIMESTEPS="2", OMP_NUM_THREADS="2", TTS_START_PERIOD="120s",
    )
    try:
        t0 = time.monotonic()
        p.compose("--profile", "local-s3", "up", "-d", "local-s3")
        wait_for(lambda: s3_client(p).list_buckets() is not None, 90, "local-s3 answering", p)
        ckpt = build_checkpoint(tmp / "voxcpm-tiny", size="tiny", seed=0)
        pub = db.sh([sys.executable, "-m", "bootstrap", "publish", str(ckpt), MODEL_URI, "--version", "v1",
                     "--create-bucket"], cwd=REPO_ROOT, timeout=300,
                    env={**os.environ, "S3_ENDPOINT_URL": f"http://127.0.0.1:{p.settings['LOCAL_S3_PORT']}",
                         "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                         "S3_ADDRESSING_STYLE": "path", "AWS_DEFAULT_REGION": "us-east-1"})
        assert b"published" in pub.stdout
        p.compose("--profile", "local-s3", "up", "-d", timeout=900)
        wait_for(lambda: gateway_ready(p), 240, "the gateway serving a ready worker", p)
        p.notes["_cold_up_s"] = f"{time.monotonic() - t0:.1f}"
        yield p
    finally:
        p.compose("--profile", "local-s3", "down", "-v", "--remove-orphans", "-t", "5", check=False, timeout=300)


def tts_running(p: db.Project) -> list[str]:
    return p.containers("tts", all=False)


def worker_image(p: db.Project, cid: str) -> str:
    return p.inspect(cid)["Config"]["Image"]


# -- the bundle serves ----------------------------------------------------------------------------
def clip(seconds=3.0, rate=22050):
    t = np.arange(int(rate * seconds)) / rate
    audio = (0.3 * np.sin(2 * np.pi * 160 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV")
    return buf.getvalue()


def test_images_carry_the_version_last_so_a_release_rebuilds_no_layer(engine, images):
    """Item 6: VERSION/GIT_REVISION come last, so OLD and NEW share every layer (only labels differ)."""
    for which in ("worker", "gateway"):
        old, new = (json.loads(db.docker(engine, "image", "inspect", images[(which, t)])) [0] for t in (OLD, NEW))
        assert old["RootFS"]["Layers"] == new["RootFS"]["Layers"], f"{which}: a release rebuilt layers"
        assert old["Config"]["Labels"]["org.opencontainers.image.version"] == OLD
        assert new["Config"]["Labels"]["org.opencontainers.image.version"] == NEW


def test_cold_up_serves_through_the_gateway(project):
    url = _http(project)
    assert requests.get(f"{url}/tts", timeout=10).status_code in (401, 405)
    r = requests.post(f"{url}/tts", json={"text": "hello world"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]
    r = requests.post(f"{url}/tts", json={"text": "hello world", "seed": 1}, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["duration"] > 0 and r.json()["sample_rate"] == 44100
    r = requests.post(f"{url}/v1/audio/speech", json={"input": "Bearer keys work.", "response_format": "wav"},
                      headers=BEARER, timeout=120)
    assert r.status_code == 200 and r.content[:4] == b"RIFF", r.text[:300]
    with requests.post(f"{url}/v1/audio/speech", json={"input": "Streaming pcm.", "response_format": "pcm",
                                                      "stream": True}, headers=BEARER, timeout=120, stream=True) as r:
        assert r.status_code == 200 and r.headers.get("X-Sample-Rate") == "44100"
        assert r.headers.get("Transfer-Encoding") == "chunked"
        assert sum(len(c) for c in r.iter_content(4096)) > 0
    ws = websocket.create_connection(f"ws://127.0.0.1:{project.settings['GATEWAY_PORT']}/v1/stream",
                                     header=[f"Authorization: {AUTH['Authorization']}"], timeout=120)
    try:
        ws.send(json.dumps({"text": "Over a WebSocket.", "format": "pcm16", "sample_rate": 44100}))
        header, chunks, done = ws_collect(ws)
        assert header is not None and chunks and done["type"] == "done", done
    finally:
        ws.close()
    r = requests.post(f"{url}/v1/voices", files={"file": ("ref.wav", clip(), "audio/wav")},
                      data={"name": "Bundle voice", "text": "What the clip says."}, headers=AUTH, timeout=60)
    assert r.status_code == 201, r.text
    project.notes["_voice"] = r.json()["id"]
    r = requests.post(f"{url}/tts", json={"text": "Cloned.", "style": project.notes["_voice"]}, headers=AUTH,
                      timeout=120)
    assert r.status_code == 200, r.text
    ready = requests.get(f"{url}/readyz", headers=AUTH, timeout=10).json()
    assert ready["bootstrap"]["phase"] == "ready" and not ready["bootstrap"].get("offline")
    project.notes["_digest"] = ready["bootstrap"]["digest"]
    print(f"cold compose up (store, publish, worker healthy, gateway): {project.notes['_cold_up_s']}s")


def test_down_up_keeps_voices_and_model_and_starts_with_the_store_down(project):
    """Item 5: a warm start needs no store; the volume's verified version is served, with a warning."""
    project.compose("--profile", "local-s3", "down", "-t", "10")
    t0 = time.monotonic()
    project.compose("up", "-d", timeout=600)  # no local-s3 profile: the store is not there at all
    wait_for(lambda: gateway_ready(project), 180, "the gateway after down/up with the store down", project)
    print(f"warm compose up with the store down: {time.monotonic() - t0:.1f}s")
    url = _http(project)
    boot = requests.get(f"{url}/readyz", headers=AUTH, timeout=10).json()["bootstrap"]
    assert boot["offline"] is True and "store unreachable" in boot["warning"], boot
    assert boot["digest"] == project.notes["_digest"]
    assert "store unreachable" in project.logs("tts")
    voices = requests.get(f"{url}/v1/voices", headers=AUTH, timeout=10).json()["voices"]
    assert project.notes["_voice"] in [v["id"] for v in voices]
    assert requests.post(f"{url}/tts", json={"text": "Still here."}, headers=AUTH, timeout=120).status_code == 200
    project.compose("--profile", "local-s3", "up", "-d", "local-s3")
    wait_for(lambda: s3_client(project).list_buckets() is not None, 90, "local-s3 back", project)


def test_worker_stop_start_on_a_new_ip_is_served_again_without_touching_the_gateway(project, engine):
    """Item 3: the gateway re-resolves the worker's name; nothing is done to the gateway here."""
    (tts,) = tts_running(project)
    gateway = project.containers("gateway", all=False)[0]
    gw_started = project.inspect(gateway)["State"]["StartedAt"]
    net = f"{project.name}_default"
    old_ip = project.inspect(tts)["NetworkSettings"]["Networks"][net]["IPAddress"]
    db.docker(engine, "stop", "--timeout", "30", tts)
    # Something else takes the freed address, so the worker must come back on another one.
    filler = db.docker(engine, "run", "-d", "--rm", "--network", net, db.DEBIAN_IMAGE, "sleep", "600").strip()
    try:
        db.docker(engine, "start", tts)
        new_ip = project.inspect(tts)["NetworkSettings"]["Networks"][net]["IPAddress"]
        assert new_ip != old_ip, "the worker came back on its old address; the test proves nothing"
        wait_for(lambda: db.sh(["docker", "exec", tts, "python", "-c",
                                "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz')"],
                               env=engine, check=False).returncode == 0, 180, "the restarted worker ready", project)
        t_ready = time.monotonic()
        wait_for(lambda: gateway_ready(project), 15, "the gateway reaching the worker at its new address", project,
                 interval=0.2)
        print(f"served through the gateway {time.monotonic() - t_ready:.1f}s after the worker was ready")
    finally:
        db.docker(engine, "rm", "-f", filler, check=False)
    assert project.inspect(gateway)["State"]["StartedAt"] == gw_started


def test_dockerd_restart_brings_every_service_back(project, engine):
    """Like a reboot: the engine stops every container; restart policies bring them all back."""
    before = {s: project.containers(s, all=False) for s in ("tts", "gateway", "local-s3")}
    assert all(before.values()), before
    t0 = time.monotonic()
    db.restart_dockerd(engine)
    wait_for(lambda: gateway_ready(project), 240, "the bundle after a dockerd restart", project)
    print(f"bundle serving again {time.monotonic() - t0:.1f}s after the dockerd restart began")
    for service, ids in before.items():
        assert project.containers(service, all=False) == ids, f"{service} did not come back"
    wait_for(lambda: s3_client(project).list_buckets() is not None, 60, "local-s3 after the restart", project)


# -- rollouts -------------------------------------------------------------------------------------
class Load:
    """One client sending short requests through the gateway for as long as it runs.

    Every answer must be a 200. A request that gets no answer at all (refused, or reset before any
    response: the gateway's container is being replaced, and Docker's port proxy accepts and drops
    the connection) is one the gateway never received; it is retried, and when that happened is kept
    so the test can check it happened only while the gateway was being replaced.
    """

    def __init__(self, url: str):
        self.url = url
        self.counts: Counter = Counter()
        self.failures: list[tuple[float, str]] = []
        self.unanswered: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            path, body = ("/tts", {"text": "Load."}) if i % 3 == 0 else ("/readyz", None)
            while not self._stop.is_set():
                try:
                    if body is None:
                        r = requests.get(self.url + path, headers=AUTH, timeout=60)
                    else:
                        r = requests.post(self.url + path, json=body, headers=AUTH, timeout=60)
                except requests.ConnectionError as e:
                    self.unanswered.append((time.monotonic(), f"{path}: {e}"))
                    time.sleep(0.05)
                    continue
                self.counts[r.status_code] += 1
                if r.status_code != 200:
                    self.failures.append((time.monotonic(), f"{path}: {r.status_code} {r.text[:200]}"))
                break

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(90)


def rollout(project: db.Project, *args: str, timeout: float = 600, **env: str):
    return db.sh(["bash", "scripts/rollout.sh", *args], env={**project.env, **env}, cwd=project.root,
                 timeout=timeout, check=False)


def rollout_under_load(project: db.Project, *args: str) -> tuple[int, str, Load]:
    """rollout.sh while a Load runs; checks that every request was answered 200, and that the ones
    never answered fell in the gateway's replacement (from its `up` line to the script's end)."""
    import subprocess

    (gateway,) = project.containers("gateway", all=False)
    # The gateway's own log (the container is replaced at the end, taking its log with it).
    gw_log = subprocess.Popen(["docker", "logs", "-f", "-t", "--since", "1s", gateway], env=project.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with Load(_http(project)) as load:
        t0 = time.monotonic()
        proc = subprocess.Popen(["bash", "scripts/rollout.sh", *args], env=project.env, cwd=project.root,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines, gateway_swap = [], None
        for line in proc.stdout:
            lines.append(f"{time.monotonic() - t0:6.1f}s {line.rstrip()}")
            if gateway_swap is None and "up -d --no-deps gateway" in line:
                gateway_swap = time.monotonic()
        proc.wait(600)
        ended = time.monotonic()
        time.sleep(2)  # and the requests right after it
    log = "\n".join(lines)
    print(f"rollout {' '.join(args)}: {ended - t0:.1f}s; answers: {dict(load.counts)}; "
          f"unanswered (retried): {len(load.unanswered)}")
    failed = [f"{t - t0:6.1f}s {what}" for t, what in load.failures]
    early = [f"{t - t0:6.1f}s {what}" for t, what in load.unanswered if gateway_swap is None or t < gateway_swap]
    gw_log.terminate()
    gw_lines = gw_log.communicate(timeout=30)[0].splitlines()
    if proc.returncode or failed or early:
        print(f"rollout.sh, timed:\n{log}\nfailed requests:\n" + "\n".join(failed[:20])
              + "\nunanswered before the gateway's replacement:\n" + "\n".join(early[:20])
              + "\nthe replaced gateway's errors:\n"
              + "\n".join(ln for ln in gw_lines if '"status":200' not in ln)[-6000:])
    assert proc.returncode == 0, log
    assert not failed, failed[:20]
    assert not early, early[:20]
    assert load.counts[200] > 10
    return proc.returncode, log, load


def out(r) -> str:
    return (r.stdout + r.stderr).decode(errors="replace")


def assert_serving(project: db.Project, tag: str, images) -> None:
    running = tts_running(project)
    assert len(running) == 1, running
    assert worker_image(project, running[0]) == images[("worker", tag)]
    assert project.containers("tts", all=True) == running, "a stopped or created tts container was left"
    (gw,) = project.containers("gateway", all=False)
    assert worker_image(project, gw) == images[("gateway", tag)]
    assert project.read_env()["VOXBOX_TAG"] == tag
    assert gateway_ready(project)


def test_rollout_with_a_failed_up_leaves_the_old_worker_and_nothing_behind(project, images):
    """Items 1 + 2: compose.yaml alone asks for an nvidia device, which a CPU host has not: `up` fails."""
    r = rollout(project, NEW, COMPOSE=f"docker compose -p {project.name} -f compose.yaml")
    assert r.returncode == 1, out(r)
    assert "nvidia" in out(r) and f"{OLD} keeps serving" in out(r)
    assert_serving(project, OLD, images)


def test_rollout_with_a_stopped_old_replica_under_load(project, images, engine):
    """Item 1: a stopped replica must not be restarted as "the new worker"; no request fails."""
    serving = tts_running(project)
    project.compose("up", "-d", "--no-deps", "--no-recreate", "--scale", "tts=2", "tts")
    extra = [c for c in project.containers("tts") if c not in serving]
    for c in extra:
        db.docker(engine, "stop", "--timeout", "5", c)
    assert len(extra) == 1 and tts_running(project) == serving, (extra, serving)
    _, log, _ = rollout_under_load(project, NEW)  # no COMPOSE: the script must see this is a CPU host
    assert "compose.cpu.yaml" in log and f"now serving {NEW}" in log
    assert_serving(project, NEW, images)


@pytest.mark.parametrize("case, setting, expect", [
    # running, but its health check never passes (it listens elsewhere): the wait times out
    ("never ready", {"BIND": "0.0.0.0:8001"}, "not healthy after 45s"),
    # exits at start (no manifest there) and restarts, again and again
    ("crash loop", {"MODEL_URI": "s3://models/no-such-model/"}, "removing it"),
])
def test_rollout_of_a_worker_that_never_turns_healthy_is_undone(project, images, case, setting, expect):
    project.write_env(**setting)  # only a container created from now on sees it: the new worker
    try:
        r = rollout(project, OLD, HEALTH_TIMEOUT_S="45")
    finally:
        project.write_env(**{**dict.fromkeys(setting), "MODEL_URI": MODEL_URI})
    assert r.returncode == 1, out(r)
    assert expect in out(r) and f"{NEW} keeps serving" in out(r), out(r)
    assert_serving(project, NEW, images)


def test_rollback_under_load(project, images):
    _, log, _ = rollout_under_load(project, "rollback")
    assert f"rolling back to {OLD}" in log
    assert_serving(project, OLD, images)


# -- scale-out on one box -------------------------------------------------------------------------
# Two cores shared with other work, replicas loading beside the one serving (each with OMP_NUM_THREADS=2):
# a short synthesis can take a minute here. Slow is not lost; the client waits.
SLOW_S = 300


def replica_names(project: db.Project) -> dict[str, str]:
    """{X-Served-By: container id} of the running tts replicas: a worker's name is its host name, which
    Docker sets to the container's short id."""
    return {project.inspect(c)["Config"]["Hostname"]: c for c in tts_running(project)}


def explain(project: db.Project, failed: list) -> str:
    """What the gateway logged for these requests (where it sent them, what it got, how long it took)."""
    log = project.compose("logs", "--no-color", "gateway", check=False, timeout=60).stdout.decode(errors="replace")
    lines = [ln for ln in log.splitlines() if any(o.rid in ln for o in failed)]
    return "\n".join([repr(o) for o in failed] + lines)


def served_by_all(url: str, names: set[str], **body) -> dict[str, list]:
    """Syntheses through the gateway until every one of `names` served one (it picks a worker at random)."""
    load = SpeechLoad(url, 0, AUTH, timeout=SLOW_S)
    seen: dict[str, list] = {}
    for _ in range(60):
        out = load.one(stream=False, **body)
        assert out.ok, out
        seen.setdefault(out.served_by, []).append(out)
        if set(seen) >= names:
            break
    assert set(seen) == names, ({k: len(v) for k, v in seen.items()}, names)
    return seen


def test_scale_to_three_replicas_under_load_shares_voices_and_loses_only_a_killed_ones_streams(project, images,
                                                                                                  engine):
    """`docker compose up --scale tts=3`: the gateway finds the new replicas by the service name (no reload)
    and spreads requests over them; replicas that are still loading answer 503, which it retries elsewhere,
    so scaling up under load fails nothing. Voices live on the shared models volume: one upload serves on
    every replica. A replica killed mid-load costs only the streams it was sending; then rollout.sh
    replaces the two left with two new ones, and the service is scaled back to one."""
    url = _http(project)
    with SpeechLoad(url, 2, AUTH, max_len=4, timeout=SLOW_S) as load:
        time.sleep(2)
        project.compose("up", "-d", "--no-deps", "--no-recreate", "--scale", "tts=3", "tts")
        wait_for(lambda: len(tts_running(project)) == 3 and all(
            project.inspect(c)["State"]["Health"]["Status"] == "healthy" for c in tts_running(project)),
            240, "three healthy replicas", project, interval=2)
        time.sleep(3)
    failed = [o for o in load.outcomes if not o.ok]
    assert not failed and len(load.outcomes) >= 2, explain(project, failed[:5]) + project.logs("tts")
    names = replica_names(project)
    assert len(names) == 3
    served_by_all(url, set(names))

    r = requests.post(f"{url}/v1/voices", files={"file": ("ref.wav", clip(), "audio/wav")},
                      data={"name": "Everywhere", "text": "What the clip says."}, headers=AUTH, timeout=60)
    assert r.status_code == 201, r.text
    with_voice = served_by_all(url, set(names), voice=r.json()["id"], seed=3)
    print(f"\nscaled to 3 under load: {len(load.outcomes)} requests, none failed; "
          f"a voice uploaded on {r.headers['X-Served-By']} served by {({k: len(v) for k, v in with_voice.items()})}")

    with SpeechLoad(url, 3, AUTH, max_len=16, timeout=SLOW_S) as load:
        cut = load.streaming(120)  # the replica sending it is killed mid-stream
        victim = cut.served_by
        killing = time.monotonic()
        db.docker(engine, "kill", names[victim])
        killed_at = time.monotonic()  # dead by now
        time.sleep(10)  # past the gateway's 5 s cache of the name's addresses
    failed = [o for o in load.outcomes if not o.ok]
    print(f"killed replica {victim} under load: {len(load.outcomes)} requests, {len(failed)} failed "
          f"({[(o.served_by, o.streamed, o.error) for o in failed]})")
    assert cut.ended < killed_at or not cut.ok, "a stream outlived the replica sending it"
    for o in failed:
        assert o.served_by == victim and o.streamed and o.status == 200, explain(project, [o])
        assert o.started < killed_at and o.ended > killing, o
    after = [o for o in load.outcomes if o.started > killed_at]
    assert len(after) >= 2 and all(o.ok for o in after) and victim not in {o.served_by for o in after}, \
        explain(project, [o for o in after if not o.ok])

    _, log, _ = rollout_under_load(project, NEW)  # removes the killed replica; two new ones replace the two left
    running = tts_running(project)
    assert len(running) == 2 and {worker_image(project, c) for c in running} == {images[("worker", NEW)]}, log
    served_by_all(url, set(replica_names(project)))

    # Scaled down, as the README says: a reload makes the gateway forget the removed replicas at once (a
    # removed container's address is silent: until its cached entry expires, a request could spend the
    # 2 s connect timeout on it before being retried on the one left).
    project.compose("up", "-d", "--no-deps", "--no-recreate", "--scale", "tts=1", "tts")
    project.compose("exec", "-T", "gateway", "sh", "/opt/voxbox-gateway/render.sh", "--reload")
    wait_for(lambda: gateway_ready(project), 30, "the gateway after scaling down", project)
    assert_serving(project, NEW, images)
