"""Model versions on a shared volume (issue 16, 4): PRUNE=off never prunes at a pull, PRUNE=shared-grace prunes
only versions no heartbeat has named for PRUNE_GRACE_S (no flock involved), `python -m bootstrap prune`
does it by hand; PRUNE=local (per-pod volumes) is today's flock rule (tests/test_bootstrap_pull.py)."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

pytest.register_assert_rewrite("tests.support.s3")  # before the import below

from bootstrap.heartbeat import heartbeat_dir, heartbeat_path, last_beats
from bootstrap.puller import COMPLETE, prune_versions, pull
from bootstrap.settings import BootstrapSettings
from bootstrap.status import Status

from .support.procs import PYTHON, REPO_ROOT, wait_until
from .support.s3 import bootstrap_env, publish_versions, run_bootstrap, settings_from

pytest_plugins = ["tests.support.s3"]
DAY = 86400


def version(models: Path, name: str, age_s: float) -> Path:
    """A complete version last made current age_s ago."""
    d = models / "versions" / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    (d / COMPLETE).write_text("")
    t = time.time() - age_s
    os.utime(d / COMPLETE, (t, t))
    os.utime(d, (t, t))
    return d


def heartbeat_of(models: Path, who: str, name: str, age_s: float) -> Path:
    f = heartbeat_dir(models) / f"{who}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"version": name, "at": time.time() - age_s, "pid": 1}))
    return f


def settings(models: Path, **kw) -> BootstrapSettings:
    return BootstrapSettings(models_dir=models, **kw)


def test_shared_grace_prunes_only_versions_no_pod_used_within_the_grace_period(tmp_path):
    models = tmp_path / "m"
    current = version(models, "cur", 2 * DAY)
    served = version(models, "served", 3 * DAY)  # made current long ago, but a pod still serves it
    crashed = version(models, "crashed", 3 * DAY)  # its pod died a while ago: the heartbeat went stale
    unused = version(models, "unused", 5 * DAY)
    recent = version(models, "recent", 60)  # made current a minute ago by some pod: not yet heartbeat-ed
    heartbeat_of(models, "pod-a.1", "served", 30)
    stale = heartbeat_of(models, "pod-b.1", "crashed", 2 * DAY)
    s = settings(models, prune="shared-grace", prune_grace_s=DAY, keep_versions=1)

    assert sorted(prune_versions(s, current, dry_run=True)) == ["crashed", "unused"]
    assert crashed.exists() and unused.exists() and stale.exists()  # a dry run touches nothing

    assert sorted(prune_versions(s, current)) == ["crashed", "unused"]
    assert current.exists() and served.exists() and recent.exists()
    assert not crashed.exists() and not unused.exists()
    assert not stale.exists(), "heartbeats older than the grace period are cleaned up"
    assert last_beats(models) == {"served": pytest.approx(time.time() - 30, abs=5)}


def test_keep_versions_still_holds_under_shared_grace(tmp_path):
    models = tmp_path / "m"
    current = version(models, "cur", 0)
    older = [version(models, f"v{i}", (i + 2) * DAY) for i in range(3)]
    s = settings(models, prune="shared-grace", prune_grace_s=DAY, keep_versions=2)
    assert prune_versions(s, current) == ["v1", "v2"]  # the newest other version stays for a quick rollback
    assert older[0].exists()


def test_off_never_prunes_at_a_pull_but_prunes_by_hand_with_the_grace_rule(tmp_path):
    models = tmp_path / "m"
    current = version(models, "cur", 0)
    old = [version(models, f"v{i}", 10 * DAY) for i in range(3)]
    s = settings(models, prune="off", prune_grace_s=DAY, keep_versions=1)
    assert prune_versions(s, current) == []
    assert all(d.exists() for d in old)
    heartbeat_of(models, "pod-a.7", "v1", 10)
    assert sorted(prune_versions(s, current, by_hand=True)) == ["v0", "v2"]
    assert old[1].exists()


def test_local_mode_is_the_flock_rule(tmp_path):
    models = tmp_path / "m"
    current = version(models, "cur", 0)
    version(models, "a", DAY)
    version(models, "b", 2 * DAY)
    # A heartbeat means nothing to PRUNE=local (per-pod volumes): only KEEP_VERSIONS and in-use locks count.
    heartbeat_of(models, "pod.1", "b", 1)
    assert prune_versions(settings(models, keep_versions=2), current) == ["b"]


def test_grace_must_outlast_several_heartbeats():
    with pytest.raises(ValidationError, match="PRUNE_GRACE_S=100 must be at least 3 x HEARTBEAT_INTERVAL_S=60"):
        BootstrapSettings(prune="shared-grace", prune_grace_s=100)
    with pytest.raises(ValidationError):
        BootstrapSettings(prune="sometimes")


def test_heartbeat_process_beats_while_its_parent_lives_and_cleans_up_after(tmp_path):
    models = tmp_path / "m"
    path = heartbeat_path(models, pid=4242)
    # A stand-in for gunicorn after bootstrap's exec: a process whose child is the heartbeat.
    parent = subprocess.Popen([PYTHON, "-c", f"""
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-m", "bootstrap", "heartbeat", "abc123", str(os.getpid()), {str(path)!r}])
time.sleep(60)
"""], cwd=REPO_ROOT, env={**os.environ, "MODELS_DIR": str(models), "HEARTBEAT_INTERVAL_S": "0.3",
                         "PRUNE_GRACE_S": "10"})
    try:
        wait_until(path.exists, 15, "the first heartbeat")
        first = json.loads(path.read_text())["at"]
        wait_until(lambda: path.exists() and json.loads(path.read_text())["at"] > first, 5, "a second heartbeat")
        assert last_beats(models)["abc123"] > first
    finally:
        parent.kill()
        parent.wait()
    wait_until(lambda: not path.exists(), 5, "the heartbeat to be removed once its server is gone")


def test_shared_grace_pulls_keep_what_other_pods_serve_and_prune_by_hand(s3_server, published, tmp_path,
                                                                        monkeypatch):
    """Real pulls from SeaweedFS into one volume, as pods on a shared claim do (no in-use flock held)."""
    models = tmp_path / "m"
    uris = publish_versions(s3_server, published[0], tmp_path, "grace", 3, seed=20)

    def env_for(i, **kw):
        return bootstrap_env(s3_server, models, uris[i], KEEP_VERSIONS=1, PRUNE="shared-grace", PRUNE_GRACE_S=5,
                             HEARTBEAT_INTERVAL_S=1, **kw)

    # Each pull writes a heartbeat naming its version: within the grace period nothing is pruned.
    dirs = []
    for i in range(3):
        monkeypatch.setenv("POD_NAME", f"worker-{i}")  # one pod each (the chart sets POD_NAME)
        dirs.append(pull(settings_from(env_for(i)), Status(tmp_path / "s")).model_dir)
    assert all(d.exists() for d in dirs)
    beats = sorted(json.loads(f.read_text())["version"] for f in heartbeat_dir(models).glob("*.json"))
    assert beats == sorted(d.name for d in dirs)
    # A pod still serves v0: its heartbeat is fresh. v1's pod is gone (its heartbeat is old).
    for f in heartbeat_dir(models).glob("*.json"):
        data = json.loads(f.read_text())
        data["at"] = time.time() - (0 if data["version"] == dirs[0].name else 60)
        f.write_text(json.dumps(data))
    os.utime(dirs[1] / COMPLETE, (time.time() - 60, time.time() - 60))
    os.utime(dirs[1], (time.time() - 60, time.time() - 60))

    r = run_bootstrap(env_for(2), "prune", "--dry-run")
    assert r.returncode == 0 and f"would remove 1 version(s): {dirs[1].name}" in r.stdout, r.stdout + r.stderr
    assert dirs[1].exists()
    r = run_bootstrap(env_for(2), "prune")
    assert r.returncode == 0 and f"removed 1 version(s): {dirs[1].name}" in r.stdout, r.stdout + r.stderr
    assert dirs[0].exists() and not dirs[1].exists() and dirs[2].exists()
    assert (models / "current").resolve() == dirs[2]

    # PRUNE=off: another pull prunes nothing, whatever its age.
    os.utime(dirs[0] / COMPLETE, (time.time() - 600, time.time() - 600))
    pull(settings_from({**env_for(2), "PRUNE": "off"}), Status(tmp_path / "s"))
    assert dirs[0].exists()


def test_entrypoint_keeps_a_heartbeat_for_the_served_version(s3_server, published, tmp_path):
    """`python -m bootstrap` (run) with PRUNE=shared-grace: after the exec, the server (a stand-in gunicorn)
    is named in a heartbeat that is refreshed while it runs and removed when it exits."""
    uri, _ = published
    models = tmp_path / "m"
    fake = tmp_path / "bin" / "gunicorn"
    fake.parent.mkdir()
    fake.write_text(f"""#!{PYTHON}
import json, os, time
from pathlib import Path
beats = Path(os.environ["MODELS_DIR"]) / ".voxbox" / "heartbeats"
want = Path(os.environ["MODEL_DIR"]).name
seen = []
deadline = time.time() + 20
while len(set(seen)) < 2 and time.time() < deadline:
    for f in beats.glob("*.json"):
        try:
            d = json.loads(f.read_text())
        except ValueError:
            continue
        if d["version"] == want and d["pid"] != os.getpid():
            seen.append(d["at"])
    time.sleep(0.1)
print(json.dumps({{"beats": len(set(seen)), "version": want}}))
""")
    fake.chmod(0o755)
    env = bootstrap_env(s3_server, models, uri, PATH=f"{fake.parent}:{os.environ['PATH']}", PRUNE="shared-grace",
                        HEARTBEAT_INTERVAL_S="0.3", PRUNE_GRACE_S="60", POD_NAME="worker-x")
    r = run_bootstrap(env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["beats"] >= 2, "the heartbeat was not refreshed while the server ran"
    # The server exited: its companion notices and removes the heartbeat.
    wait_until(lambda: not list(heartbeat_dir(models).glob("worker-x.*.json")), 5, "the heartbeat to go")
