"""bootstrap against a misbehaving or misconfigured store: retried faults, and the fatal errors
(one line on stderr, exit status 1, nothing half-written at a final path)."""
import json
import os
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.support.s3")  # before the import below

from bootstrap.puller import pull
from bootstrap.status import Status

from .support.faultproxy import FaultProxy
from .support.s3 import MB, bootstrap_env, files_of, make_model, run_bootstrap, settings_from

pytest_plugins = ["tests.support.s3"]


def test_resets_throttling_5xx_and_truncated_bodies_are_retried(s3_server, published, tmp_path):
    uri, local = published
    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.faults = [("model.safetensors", "reset"), ("model.safetensors", "503"), ("model.safetensors", "truncate"),
                        ("audiovae.pth", "500"), ("audiovae.pth", "truncate"), ("audiovae.pth", "reset"),
                        ("config.json", "503"), ("manifest.json", "503")]
        env = bootstrap_env(s3_server, tmp_path / "m", uri, proxy.url)
        result = pull(settings_from(env), Status(tmp_path / "status.json"))
        assert len(proxy.injected) == 8 and not proxy.faults
        assert proxy.gets[f"/{uri[5:]}audiovae.pth"] == 4  # three faults, then the good answer
    assert files_of(result.model_dir) == files_of(local)
    assert json.loads((tmp_path / "status.json").read_text())["phase"] == "ready"


def _fatal(r) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    last = lines[-1]
    assert last.startswith("bootstrap: fatal: ") and "Traceback" not in r.stderr
    assert sum(line.startswith("bootstrap: fatal: ") for line in lines) == 1
    return last


def _status(models) -> dict:
    return json.loads((models / ".voxbox" / "status.json").read_text())


def test_fatal_no_such_bucket(s3_server, tmp_path):
    r = run_bootstrap(bootstrap_env(s3_server, tmp_path / "m", "s3://no-such-bucket-xyz/x/"), "pull")
    assert "bucket 'no-such-bucket-xyz' does not exist" in _fatal(r)
    status = _status(tmp_path / "m")
    assert status["phase"] == "failed" and "no-such-bucket-xyz" in status["error"]


def test_fatal_access_denied_with_a_wrong_secret_key(s3_server, published, tmp_path):
    uri, _ = published
    env = {**bootstrap_env(s3_server, tmp_path / "m", uri), "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    line = _fatal(run_bootstrap(env, "pull"))
    assert "access denied" in line and "AWS_SECRET_ACCESS_KEY" in line
    assert "wrong-secret" not in line


def test_fatal_manifest_missing_says_how_to_publish(s3_server, published, tmp_path):
    uri, _ = published
    bucket = uri.split("/")[2]
    s3_server.client().put_object(Bucket=bucket, Key="raw/model.bin", Body=b"x" * 1000)
    raw = f"s3://{bucket}/raw/"
    line = _fatal(run_bootstrap(bootstrap_env(s3_server, tmp_path / "m", raw), "pull"))
    assert "no manifest.json" in line and "python -m bootstrap publish" in line and "ALLOW_UNVERIFIED" in line
    ok = run_bootstrap(bootstrap_env(s3_server, tmp_path / "m", raw, ALLOW_UNVERIFIED="true"), "pull")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "m" / "current" / "model.bin").read_bytes() == b"x" * 1000


def test_fatal_checksum_mismatch_after_retries(s3_server, published, tmp_path):
    uri, _ = published
    bucket, prefix = uri.split("/")[2], "/".join(uri.split("/")[3:])
    s3_server.client().put_object(Bucket=bucket, Key=prefix + "audiovae.pth", Body=os.urandom(3 * MB))  # same size
    line = _fatal(run_bootstrap(bootstrap_env(s3_server, tmp_path / "m", uri, PULL_RETRIES=2), "pull"))
    assert "checksum mismatch after 2 attempts for audiovae.pth" in line and "republish" in line
    assert not (tmp_path / "m" / "current").exists()
    assert not list((tmp_path / "m").rglob("audiovae.pth"))  # never visible at the final path


def test_fatal_disk_full_is_checked_up_front(s3_server, published, tmp_path):
    uri, _ = published
    bucket, prefix = uri.split("/")[2], "/".join(uri.split("/")[3:])
    client = s3_server.client()
    manifest = json.loads(client.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    manifest["files"][0]["size"] = 1 << 50  # a pebibyte: no disk here has that much free
    client.put_object(Bucket=bucket, Key=prefix + "manifest.json", Body=json.dumps(manifest).encode())
    with FaultProxy(s3_server.endpoint) as proxy:
        line = _fatal(run_bootstrap(bootstrap_env(s3_server, tmp_path / "m", uri, proxy.url), "pull"))
        assert proxy.body_gets() == 0  # refused before downloading anything
    assert "disk full" in line and "GB free" in line


def test_fatal_bad_uri_and_oss_without_endpoint(tmp_path):
    env = {"MODELS_DIR": str(tmp_path)}
    assert "is not s3://bucket/prefix/" in _fatal(run_bootstrap({**env, "MODEL_URI": "http://x/y"}, "pull"))
    line = _fatal(run_bootstrap({**env, "MODEL_URI": "oss://bucket/m/", "S3_ENDPOINT_URL": ""}, "pull"))
    assert "S3_ENDPOINT_URL is not set" in line


def test_fatal_bad_setting_is_one_line(tmp_path):
    line = _fatal(run_bootstrap({"MODELS_DIR": str(tmp_path), "VERIFY": "sometimes"}, "pull"))
    assert "VERIFY" in line


def test_fatal_when_a_file_keeps_breaking_off(s3_server, published, tmp_path):
    uri, _ = published
    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.faults = [("audiovae.pth", "reset")] * 30
        r = run_bootstrap(bootstrap_env(s3_server, tmp_path / "m", uri, proxy.url, PULL_RETRIES=1), "pull")
    line = _fatal(r)
    assert "downloading audiovae.pth from" in line and "failed 1 times" in line and "S3_ENDPOINT_URL" in line
    assert not (tmp_path / "m" / "current").exists() and not list((tmp_path / "m").rglob("audiovae.pth"))


# -- the store is down at a warm start ------------------------------------------------------------
@pytest.fixture
def store_went_down(tmp_path):
    """A model pulled into a volume from a store that is then stopped; returns (env, models dir, result)."""
    from .support.s3 import seaweedfs

    models = tmp_path / "m"
    with seaweedfs(tmp_path / "store") as server:
        server.client().create_bucket(Bucket="models")
        uri = "s3://models/voxcpm-1.5/v1/"
        assert run_bootstrap(server.env(), "publish", str(make_model(tmp_path / "src")), uri).returncode == 0
        env = bootstrap_env(server, models, uri)
        first = run_bootstrap(env, "pull")
        assert first.returncode == 0, first.stderr
    return env, models, first.stdout.strip()


def test_warm_start_with_the_store_down_serves_the_verified_version(store_went_down):
    env, models, first_dir = store_went_down
    r = run_bootstrap(env, "pull", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == first_dir
    assert "WARNING" in r.stderr and "store unreachable" in r.stderr
    status = _status(models)
    assert status["phase"] == "ready" and status["offline"] is True and status["warm"] is True
    assert "store unreachable" in status["warning"] and status["digest"] == Path(first_dir).name


def test_store_down_and_the_verified_version_changed_on_disk_is_fatal(store_went_down):
    env, models, first_dir = store_went_down
    target = Path(first_dir) / "config.json"
    target.write_text(target.read_text().replace("voxcpm", "VOXCPM"))  # same size, new content and mtime
    line = _fatal(run_bootstrap(env, "pull", timeout=180))
    assert "cannot read" in line and "no verified model on the volume" in line


def test_store_down_and_nothing_on_the_volume_is_fatal(s3_server, tmp_path):
    from .support.procs import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = bootstrap_env(s3_server, tmp_path / "m", "s3://models/voxcpm-1.5/v1/", dead, PULL_RETRIES="1")
    line = _fatal(run_bootstrap(env, "pull", timeout=180))
    assert "no verified model on the volume" in line
    assert _status(tmp_path / "m")["phase"] == "failed"
