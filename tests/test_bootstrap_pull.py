"""bootstrap pull against a real S3 server (SeaweedFS on 127.0.0.1): publish/pull, warm start,
rollback, pruning, kill -9 resume, replicas sharing a volume."""
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from botocore.exceptions import ClientError

pytest.register_assert_rewrite("tests.support.s3")  # before the import below

from bootstrap.puller import COMPLETE, VERIFIED, pull
from bootstrap.status import Status

from .support.faultproxy import FaultProxy
from .support.procs import PYTHON, REPO_ROOT, free_port, running
from .support.s3 import bootstrap_env, files_of, make_model, publish_versions, run_bootstrap, settings_from

pytest_plugins = ["tests.support.s3"]


def test_publish_then_pull_multi_file(s3_server, published, tmp_path):
    uri, local = published
    models = tmp_path / "models"
    r = run_bootstrap(bootstrap_env(s3_server, models, uri), "pull")
    assert r.returncode == 0, r.stderr
    current = models / "current"
    assert current.is_symlink() and Path(r.stdout.strip()) == current.resolve()
    assert files_of(current) == files_of(local)  # bytes identical, nested paths included
    manifest = json.loads((current / "manifest.json").read_text())
    assert manifest["name"] == "voxcpm-1.5" and manifest["version"] == "v1" and len(manifest["files"]) == 4
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == files_of(local)
    assert not list(models.rglob("*.part*"))
    status = json.loads((models / ".voxbox" / "status.json").read_text())
    assert status["phase"] == "ready" and status["error"] is None and status["model"] == "voxcpm-1.5:v1"
    assert status["bytes_done"] == status["bytes_total"] == sum(f["size"] for f in manifest["files"])
    assert status["digest"] == current.resolve().name and status["updated_at"] > time.time() - 60
    # Where the time went, per phase: a cold pull downloaded and verified, and the phases fit in the total.
    t = status["timings"]
    assert status["warm"] is False and set(t) == {"list_s", "check_s", "wait_s", "download_s", "verify_s", "total_s"}
    assert all(v >= 0 for v in t.values()) and t["download_s"] > 0 and t["verify_s"] > 0
    assert sum(v for k, v in t.items() if k != "total_s") <= t["total_s"] + 1e-3
    assert status["started_at"] <= status["updated_at"]
    # Each phase is logged with its timing; credentials never are.
    assert "listed in" in r.stderr and "MB/s" in r.stderr and "ready in" in r.stderr
    assert s3_server.env()["AWS_SECRET_ACCESS_KEY"] not in r.stderr + r.stdout


def test_warm_start_downloads_nothing_and_is_fast(s3_server, published, tmp_path):
    uri, _ = published
    models = tmp_path / "m"
    with FaultProxy(s3_server.endpoint) as proxy:
        env = bootstrap_env(s3_server, models, uri, proxy.url)
        pull(settings_from(env), Status(tmp_path / "st.json"))
        first = proxy.body_gets()
        assert first >= 4
        t0 = time.perf_counter()
        again = pull(settings_from(env), Status(tmp_path / "st.json"))
        took = time.perf_counter() - t0
        assert proxy.body_gets() == first  # no object body was fetched the second time
    assert again.warm and again.downloaded_bytes == 0 and took < 1.0
    status = json.loads((tmp_path / "st.json").read_text())  # the warm start's, not the cold one's
    t = status["timings"]
    assert status["phase"] == "ready" and status["warm"] is True
    assert t["download_s"] == t["verify_s"] == t["wait_s"] == 0 and 0 <= t["check_s"] <= t["total_s"] <= took


def test_full_verify_rehashes_and_repairs_a_changed_file(s3_server, published, tmp_path):
    uri, local = published
    env = bootstrap_env(s3_server, tmp_path / "m", uri)
    result = pull(settings_from(env), Status(tmp_path / "st.json"))
    target = result.model_dir / "audiovae.pth"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    stat = target.stat()
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only a hash can tell
    assert pull(settings_from(env), Status(tmp_path / "st.json")).warm  # fast mode trusts size + mtime
    fixed = pull(settings_from({**env, "VERIFY": "full"}), Status(tmp_path / "st.json"))
    assert not fixed.warm and fixed.downloaded_bytes == 3 * 1024 * 1024  # only the changed file
    assert files_of(fixed.model_dir) == files_of(local)


def test_a_touched_file_is_downloaded_again_in_fast_mode(s3_server, published, tmp_path):
    uri, local = published
    env = bootstrap_env(s3_server, tmp_path / "m", uri)
    result = pull(settings_from(env), Status(tmp_path / "st.json"))
    (result.model_dir / "config.json").write_text("{}")  # new size and mtime: no longer verified
    again = pull(settings_from(env), Status(tmp_path / "st.json"))
    assert not again.warm and files_of(again.model_dir) == files_of(local)
    assert again.downloaded_bytes == (local / "config.json").stat().st_size


def test_rollback_to_an_earlier_version_downloads_nothing(s3_server, published, tmp_path):
    uri1, _ = published
    bucket = uri1.split("/")[2]
    uri2 = f"s3://{bucket}/voxcpm-1.5/v2/"
    local2 = make_model(tmp_path / "v2", seed=2)
    assert run_bootstrap(s3_server.env(), "publish", str(local2), uri2).returncode == 0
    models = tmp_path / "m"
    with FaultProxy(s3_server.endpoint) as proxy:
        v1 = pull(settings_from(bootstrap_env(s3_server, models, uri1, proxy.url)), Status(tmp_path / "s"))
        v2 = pull(settings_from(bootstrap_env(s3_server, models, uri2, proxy.url)), Status(tmp_path / "s"))
        assert (models / "current").resolve() == v2.model_dir and files_of(models / "current") == files_of(local2)
        before = proxy.body_gets()
        back = pull(settings_from(bootstrap_env(s3_server, models, uri1, proxy.url)), Status(tmp_path / "s"))
        assert proxy.body_gets() == before and back.warm
    assert back.model_dir == v1.model_dir and (models / "current").resolve() == v1.model_dir
    assert v2.model_dir.exists()  # KEEP_VERSIONS=2 by default


def test_old_versions_are_pruned_keep_n_but_never_one_in_use(s3_server, published, tmp_path):
    models = tmp_path / "m"
    uris = publish_versions(s3_server, published[0], tmp_path, "prune", 4, seed=10)

    def pull_version(i, hold=False):
        env = bootstrap_env(s3_server, models, uris[i], KEEP_VERSIONS=2)
        return pull(settings_from(env), Status(tmp_path / "s"), hold=hold)

    dirs = [pull_version(i).model_dir for i in range(3)]
    assert not dirs[0].exists() and dirs[1].exists() and dirs[2].exists()
    # A replica serving v1 (it holds v1's in-use lock, as the exec'd server does) keeps v1 on disk.
    serving = pull_version(1, hold=True)
    try:
        dirs.append(pull_version(3).model_dir)
        pull_version(2)
        assert dirs[1].exists() and (dirs[1] / COMPLETE).exists()
    finally:
        serving.release()
    pull_version(3)
    assert not dirs[1].exists() and dirs[2].exists() and dirs[3].exists()


def _stage(models: Path) -> str:
    stage = "nothing"
    for vdir in (models / "versions").glob("*"):
        if list(vdir.rglob("*.part*")):
            stage = "downloading"
        if (vdir / VERIFIED).exists():
            stage = "some verified"
        if (vdir / COMPLETE).exists():
            return "complete"
    return stage


def _check_invariants(models: Path, expected: dict) -> str:
    """What a reader may see after a kill: every file at a final path is complete and correct, every
    file the state records as verified still matches, `current` is absent or a complete version."""
    stage = "nothing"
    for vdir in (models / "versions").glob("*"):
        state = json.loads((vdir / VERIFIED).read_text()) if (vdir / VERIFIED).exists() else {}
        for rel, digest in expected.items():
            p = vdir / rel
            if p.exists():
                assert hashlib.sha256(p.read_bytes()).hexdigest() == digest, f"corrupt {p}"
            if rel in state:
                assert p.exists() and state[rel]["sha256"] == digest and p.stat().st_size == state[rel]["size"]
        if list(vdir.rglob("*.part*")):
            stage = "downloading"
        if state:
            stage = "some verified"
        if (vdir / COMPLETE).exists():
            stage = "complete"
    current = models / "current"
    if current.exists() or current.is_symlink():
        assert (current.resolve() / COMPLETE).exists(), "current points at an incomplete version"
        assert files_of(current) == expected
    return stage


def test_kill_9_at_random_points_then_resume(s3_server, published, tmp_path):
    uri, local = published
    expected = files_of(local)
    models = tmp_path / "m"
    rng = random.Random(1234)
    stages = []
    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.delay_s = 0.03  # ~1.5 s per large body, so kills land mid-transfer, mid-verify, mid-rename
        env = {**os.environ, **bootstrap_env(s3_server, models, uri, proxy.url, PULL_CONCURRENCY=2)}
        for i in range(12):
            proc = subprocess.Popen([PYTHON, "-m", "bootstrap", "pull"], env=env, cwd=REPO_ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # Kill at random moments, but make sure some land while bodies are in flight and some
            # after the first files were verified: wait for that stage (on this run's own progress).
            wait_for = ("anything", "downloading", "some verified")[i % 3]
            deadline = time.monotonic() + 10
            while wait_for != "anything" and time.monotonic() < deadline and proc.poll() is None:
                if _stage(models) in (wait_for, "some verified", "complete"):
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.6) if wait_for != "anything" else rng.uniform(0.2, 1.2))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stages.append(_check_invariants(models, expected))
            if stages[-1] == "complete" and i < 10:  # a run finished before its kill: start over
                for p in (models / "versions").glob("*"):
                    subprocess.run(["rm", "-rf", str(p)], check=True)
                (models / "current").unlink(missing_ok=True)
        proxy.delay_s = 0
        proxy.reset_counts()
        r = run_bootstrap(bootstrap_env(s3_server, models, uri, proxy.url), "pull")
        assert r.returncode == 0, r.stderr
        resumed_bytes = sum(n for k, n in proxy.body_bytes.items() if not k.endswith("manifest.json"))
    # The kills really interrupted pulls in progress, some of them after files were verified.
    assert stages.count("downloading") + stages.count("some verified") >= 3 and "some verified" in stages, stages
    assert files_of(models / "current") == expected
    assert not list(models.rglob("*.part*")) and not list(models.glob(".current.*"))
    if stages[-1] == "some verified":  # files verified before the last kill were kept, not fetched again
        assert resumed_bytes < sum((local / p).stat().st_size for p in expected)


def test_four_pullers_at_once_fetch_each_object_once(s3_server, published, tmp_path):
    uri, local = published
    sizes = {p: (local / p).stat().st_size for p in files_of(local)}
    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.delay_s = 0.02  # about a second per large body, so all four overlap
        shared = tmp_path / "shared"
        env = {**os.environ, **bootstrap_env(s3_server, shared, uri, proxy.url)}
        procs = [subprocess.Popen([PYTHON, "-m", "bootstrap", "pull"], env=env, cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
        outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-800:] for o in outs]
    bodies = {k.split("/v1/", 1)[1]: n for k, n in proxy.body_bytes.items() if not k.endswith("manifest.json")}
    assert bodies == sizes  # each object's bytes crossed the wire exactly once, for all four
    # One downloaded; the others waited for its lock (or came after it) and reused its files.
    assert sum("MB downloaded)" in o[1] for o in outs) == 1
    assert sum("warm start, nothing downloaded" in o[1] for o in outs) == 3
    assert len({o[0].strip() for o in outs}) == 1 and files_of(shared / "current") == files_of(local)


def test_readyz_of_a_worker_started_by_the_entrypoint_shows_where_start_up_time_went(s3_server, published, tmp_path):
    """The real entrypoint, pull then the real gunicorn worker (embedded engine, so it starts fast):
    /readyz carries the pull's phases from the status file and the worker's own load and warm-up."""
    uri, _ = published
    port = free_port()
    env = bootstrap_env(s3_server, tmp_path / "m", uri, TTS_ENGINE="embedded", BIND=f"127.0.0.1:{port}",
                        VOICES_DIR=tmp_path / "voices", STATUS_FILE=tmp_path / "status.json",
                        PATH=f"{Path(PYTHON).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    url = f"http://127.0.0.1:{port}"
    with running([PYTHON, "-m", "bootstrap", "run"], tmp_path / "entrypoint.log", env=env, timeout=180,
                 ready=lambda: requests.get(f"{url}/readyz", timeout=2).status_code == 200, what="entrypoint"):
        ready = requests.get(f"{url}/readyz").json()
        info = requests.get(f"{url}/info").json()
        metrics = requests.get(f"{url}/metrics").text
    boot, startup = ready["bootstrap"], ready["startup"]
    assert boot["phase"] == "ready" and boot["warm"] is False and boot["timings"]["download_s"] > 0
    assert set(startup) == {"started_at", "load_s", "warmup_s", "batch_alloc_s"} and info["startup"] == startup
    assert all(startup[k] >= 0 for k in ("load_s", "warmup_s", "batch_alloc_s")) and startup["warmup_s"] > 0
    # The worker began loading after the pull had finished (the entrypoint execs it then).
    assert startup["started_at"] >= boot["started_at"] + boot["timings"]["total_s"]
    assert 'voxbox_startup_seconds{model="embedded",phase="warmup"}' in metrics


def test_entrypoint_pulls_then_execs_gunicorn_with_model_dir_and_the_version_lock(s3_server, published, tmp_path):
    """The default command pulls, then execs `gunicorn` (a stand-in here) with MODEL_DIR pointing
    at the verified version and the version's in-use lock still held, so no replica prunes it."""
    uri, local = published
    models = tmp_path / "m"
    fake = tmp_path / "bin" / "gunicorn"
    fake.parent.mkdir()
    fake.write_text(f"""#!{PYTHON}
import fcntl, json, os, sys
from pathlib import Path
model_dir = Path(os.environ["MODEL_DIR"])
fd = os.open(Path(os.environ["MODELS_DIR"]) / ".voxbox" / "locks" / (model_dir.name + ".inuse"), os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held = False
except BlockingIOError:
    held = True
print(json.dumps({{"argv": sys.argv[1:], "model_dir": str(model_dir), "lock_held": held,
                  "device": os.environ["TTS_DEVICE"], "batch": os.environ["TTS_MAX_BATCH"],
                  "status_file": os.environ["STATUS_FILE"]}}))
""")
    fake.chmod(0o755)
    env = bootstrap_env(s3_server, models, uri, PATH=f"{fake.parent}:{os.environ['PATH']}", TTS_MAX_BATCH="3")
    r = run_bootstrap(env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["argv"] == ["-c", "service/gunicorn.conf.py", "service.app:create_app()"]
    assert Path(out["model_dir"]) == (models / "current").resolve() and files_of(Path(out["model_dir"])) == files_of(local)
    assert out["lock_held"] and out["batch"] == "3" and out["device"] in ("cpu", "cuda")
    assert json.loads(Path(out["status_file"]).read_text())["phase"] == "ready"
    assert "handing off to gunicorn" in r.stderr


def test_publish_can_create_the_bucket_of_a_fresh_store(s3_server, tmp_path):
    """README's local-s3 recipe: a fresh MinIO has no bucket; publish --create-bucket makes it."""
    import uuid

    local = tmp_path / "m"
    local.mkdir()
    (local / "config.json").write_text("{}")
    bucket = f"fresh-{uuid.uuid4().hex[:8]}"
    client = s3_server.client()
    with pytest.raises(ClientError):
        client.head_bucket(Bucket=bucket)
    r = run_bootstrap(s3_server.env(), "publish", str(local), f"s3://{bucket}/m/", "--create-bucket")
    assert r.returncode == 0, r.stderr
    client.head_bucket(Bucket=bucket)  # exists now
    assert "created bucket" in r.stderr
    r = run_bootstrap(s3_server.env(), "publish", str(local), f"s3://{bucket}/m/", "--create-bucket")
    assert r.returncode == 0 and "created bucket" not in r.stderr, r.stderr  # existing: left alone


def test_entrypoint_pulls_every_model_of_MODELS_into_its_own_folder(s3_server, published, tmp_path):
    """MODELS entries with a uri are pulled like MODEL_URI, each into MODELS_DIR/models/<name>, and the
    worker gets them as `dir` with each version's in-use lock held; other entries pass unchanged."""
    uri, local = published
    bucket = uri.split("/")[2]
    other = make_model(tmp_path / "other-src", big_mb=6, seed=7)
    uri2 = f"s3://{bucket}/other/v1/"
    r = run_bootstrap(s3_server.env(), "publish", str(other), uri2, "--name", "other", "--version", "v1")
    assert r.returncode == 0, r.stderr
    models = tmp_path / "m"
    fake = tmp_path / "bin" / "gunicorn"
    fake.parent.mkdir()
    fake.write_text(f"""#!{PYTHON}
import fcntl, json, os
from pathlib import Path
entries = json.loads(os.environ["MODELS"])
held = {{}}
for e in entries:
    if "dir" in e:
        d = Path(e["dir"])
        fd = os.open(d.parent.parent / ".voxbox" / "locks" / (d.name + ".inuse"), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held[e["name"]] = False
        except BlockingIOError:
            held[e["name"]] = True
print(json.dumps({{"models": entries, "held": held}}))
""")
    fake.chmod(0o755)
    spec = [{"name": "first", "uri": uri, "default": True}, {"name": "second", "uri": uri2},
            {"name": "fast", "engine": "embedded"}]
    env = bootstrap_env(s3_server, models, "", PATH=f"{fake.parent}:{os.environ['PATH']}", MODELS=json.dumps(spec))
    r = run_bootstrap(env, timeout=180)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    first, second, fast = out["models"]
    assert "uri" not in first and Path(first["dir"]) == (models / "models" / "first" / "current").resolve()
    assert Path(second["dir"]) == (models / "models" / "second" / "current").resolve()
    assert files_of(Path(first["dir"])) == files_of(local) and files_of(Path(second["dir"])) == files_of(other)
    assert fast == {"name": "fast", "engine": "embedded"} and first["default"] is True
    assert out["held"] == {"first": True, "second": True}
    bad = run_bootstrap({**env, "MODELS": json.dumps([{"name": "x", "uri": uri, "dir": "/m"}])}, timeout=60)
    assert bad.returncode == 1 and "has both uri and dir" in bad.stderr
