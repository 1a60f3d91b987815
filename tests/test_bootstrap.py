"""bootstrap against a real S3-compatible server (SeaweedFS on 127.0.0.1), through a fault-injecting proxy."""
import hashlib
import json
import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from bootstrap.gpu import GIB, Gpu, decide, parse_nvidia_smi
from bootstrap.puller import COMPLETE, pull
from bootstrap.settings import BootstrapSettings
from bootstrap.status import Status

from .support.faultproxy import FaultProxy
from .support.procs import PYTHON, REPO_ROOT
from .support.s3 import seaweedfs

MB = 1024 * 1024


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def make_model(root: Path, big_mb: int = 12, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"architecture": "voxcpm", "seed": seed}))
    (root / "model.safetensors").write_bytes(rng.randbytes(big_mb * MB))  # above the multipart threshold
    (root / "audiovae.pth").write_bytes(rng.randbytes(3 * MB))
    (root / "tokenizer" / "nested").mkdir(parents=True, exist_ok=True)
    (root / "tokenizer" / "nested" / "tokenizer.json").write_text("{}" * 100)
    return root


def files_of(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".") and p.name != "manifest.json"}


def env_for(s3, models: Path, uri: str, endpoint=None, **extra) -> dict:
    return {**s3.env(endpoint), "MODEL_URI": uri, "MODELS_DIR": str(models), "PULL_MULTIPART_THRESHOLD_MB": "5",
            "PULL_CHUNK_MB": "5", "PULL_RETRIES": "3", "PROGRESS_INTERVAL_S": "0.5",
            **{k: str(v) for k, v in extra.items()}}


def run_cli(env: dict, *args, timeout=180):
    return subprocess.run([PYTHON, "-m", "bootstrap", *args], env={**os.environ, **env}, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def settings(env: dict) -> BootstrapSettings:
    return BootstrapSettings(**{k.lower(): v for k, v in env.items() if not k.startswith("AWS_")})


@pytest.fixture
def published(s3, tmp_path, monkeypatch):
    """A fresh bucket holding one published model; returns (uri, local model dir)."""
    bucket = f"models-{uuid.uuid4().hex[:10]}"
    s3.client().create_bucket(Bucket=bucket)
    local = make_model(tmp_path / "model-src")
    uri = f"s3://{bucket}/voxcpm-1.5/v1/"
    r = run_cli(env_for(s3, tmp_path / "unused", uri), "publish", str(local), uri, "--name", "voxcpm-1.5",
                "--version", "v1")
    assert r.returncode == 0, r.stderr
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return uri, local


def test_publish_then_pull_multi_file(s3, published, tmp_path):
    uri, local = published
    models = tmp_path / "models"
    r = run_cli(env_for(s3, models, uri), "pull")
    assert r.returncode == 0, r.stderr
    current = models / "current"
    assert current.is_symlink() and Path(r.stdout.strip()) == current.resolve()
    assert files_of(current) == files_of(local)
    manifest = json.loads((current / "manifest.json").read_text())
    assert manifest["name"] == "voxcpm-1.5" and len(manifest["files"]) == 4
    assert not list(models.rglob("*.part"))
    status = json.loads((models / ".voxbox" / "status.json").read_text())
    assert status["phase"] == "ready" and status["bytes_total"] == sum(f["size"] for f in manifest["files"])
    assert "downloaded" in r.stderr and "MB/s" in r.stderr  # phases are logged with timings


def test_faults_are_retried(s3, published, tmp_path):
    uri, local = published
    with FaultProxy(s3.endpoint) as proxy:
        proxy.faults = [("model.safetensors", "reset"), ("model.safetensors", "503"), ("audiovae.pth", "500"),
                        ("audiovae.pth", "truncate"), ("config.json", "503")]
        result = pull(settings(env_for(s3, tmp_path / "m", uri, proxy.url)), Status(tmp_path / "status.json"))
        assert len(proxy.injected) == 5 and not proxy.faults
    assert files_of(result.model_dir) == files_of(local)


def test_warm_start_downloads_nothing_and_is_fast(s3, published, tmp_path):
    uri, _ = published
    models = tmp_path / "m"
    with FaultProxy(s3.endpoint) as proxy:
        env = env_for(s3, models, uri, proxy.url)
        pull(settings(env), Status(tmp_path / "st.json"))
        first = proxy.body_gets()
        again = pull(settings(env), Status(tmp_path / "st.json"))
        assert proxy.body_gets() == first  # no object body was fetched the second time
    assert again.warm and again.seconds < 1.0


def test_full_verify_detects_a_changed_file(s3, published, tmp_path):
    uri, local = published
    models = tmp_path / "m"
    env = env_for(s3, models, uri)
    result = pull(settings(env), Status(tmp_path / "st.json"))
    target = result.model_dir / "audiovae.pth"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    stat = target.stat()
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only a hash can tell
    assert pull(settings(env), Status(tmp_path / "st.json")).warm  # fast mode trusts size + mtime
    fixed = pull(settings({**env, "VERIFY": "full"}), Status(tmp_path / "st.json"))
    assert not fixed.warm and files_of(fixed.model_dir) == files_of(local)


def test_rollback_to_an_earlier_version_downloads_nothing(s3, published, tmp_path):
    uri1, _ = published
    bucket = uri1.split("/")[2]
    uri2 = f"s3://{bucket}/voxcpm-1.5/v2/"
    assert run_cli(s3.env(), "publish", str(make_model(tmp_path / "v2", seed=2)), uri2).returncode == 0
    models = tmp_path / "m"
    with FaultProxy(s3.endpoint) as proxy:
        v1 = pull(settings(env_for(s3, models, uri1, proxy.url)), Status(tmp_path / "s"))
        v2 = pull(settings(env_for(s3, models, uri2, proxy.url)), Status(tmp_path / "s"))
        assert (models / "current").resolve() == v2.model_dir
        before = proxy.body_gets()
        back = pull(settings(env_for(s3, models, uri1, proxy.url)), Status(tmp_path / "s"))
        assert proxy.body_gets() == before and back.warm
    assert back.model_dir == v1.model_dir and (models / "current").resolve() == v1.model_dir


def test_old_versions_are_pruned_keep_n(s3, published, tmp_path):
    uri1, _ = published
    bucket = uri1.split("/")[2]
    models = tmp_path / "m"
    dirs = []
    for i in range(3):
        uri = f"s3://{bucket}/prune/v{i}/"
        assert run_cli(s3.env(), "publish", str(make_model(tmp_path / f"p{i}", big_mb=1, seed=10 + i)), uri).returncode == 0
        dirs.append(pull(settings(env_for(s3, models, uri, KEEP_VERSIONS=2)), Status(tmp_path / "s")).model_dir)
        time.sleep(0.02)
    assert not dirs[0].exists() and dirs[1].exists() and dirs[2].exists()


def _check_invariants(models: Path, local_hashes: dict) -> None:
    for vdir in (models / "versions").glob("*"):
        for rel, digest in local_hashes.items():
            p = vdir / rel
            if p.exists():  # anything at a final path is complete and correct
                assert hashlib.sha256(p.read_bytes()).hexdigest() == digest, f"corrupt {p}"
    current = models / "current"
    if current.exists() or current.is_symlink():
        assert (current.resolve() / COMPLETE).exists()


def test_kill_9_at_random_points_then_resume(s3, published, tmp_path):
    uri, local = published
    expected = files_of(local)
    models = tmp_path / "m"
    rng = random.Random(1234)
    with FaultProxy(s3.endpoint) as proxy:
        proxy.delay_s = 0.03  # slow the bodies down so the kills land mid-transfer
        env = {**os.environ, **env_for(s3, models, uri, proxy.url, PULL_CONCURRENCY=2)}
        for _ in range(10):
            proc = subprocess.Popen([PYTHON, "-m", "bootstrap", "pull"], env=env, cwd=REPO_ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.3, 2.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            _check_invariants(models, expected)
        proxy.delay_s = 0
        r = run_cli(env_for(s3, models, uri, proxy.url), "pull")
    assert r.returncode == 0, r.stderr
    assert files_of(models / "current") == expected


def test_four_pullers_at_once_fetch_each_object_once(s3, published, tmp_path):
    uri, local = published
    with FaultProxy(s3.endpoint) as proxy:
        pull(settings(env_for(s3, tmp_path / "alone", uri, proxy.url)), Status(tmp_path / "s"))
        alone = dict(proxy.gets)
        proxy.gets.clear()
        shared = tmp_path / "shared"
        env = {**os.environ, **env_for(s3, shared, uri, proxy.url)}
        procs = [subprocess.Popen([PYTHON, "-m", "bootstrap", "pull"], env=env, cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
        outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    bodies = {k: n for k, n in proxy.gets.items() if not k.endswith("manifest.json")}
    assert bodies == {k: n for k, n in alone.items() if not k.endswith("manifest.json")}
    assert len({o[0].strip() for o in outs}) == 1 and files_of(shared / "current") == files_of(local)


def _fatal(r) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("bootstrap: fatal: ") and "Traceback" not in r.stderr
    return last


def test_fatal_no_such_bucket(s3, tmp_path):
    assert "bucket 'no-such-bucket-xyz' does not exist" in _fatal(
        run_cli(env_for(s3, tmp_path / "m", "s3://no-such-bucket-xyz/x/"), "pull"))


def test_fatal_access_denied(s3, published, tmp_path):
    uri, _ = published
    env = {**env_for(s3, tmp_path / "m", uri), "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    line = _fatal(run_cli(env, "pull"))
    assert "access denied" in line and "wrong-secret" not in line


def test_fatal_manifest_missing_says_how_to_publish(s3, published, tmp_path):
    uri, _ = published
    bucket = uri.split("/")[2]
    s3.client().put_object(Bucket=bucket, Key="raw/model.bin", Body=b"x" * 1000)
    line = _fatal(run_cli(env_for(s3, tmp_path / "m", f"s3://{bucket}/raw/"), "pull"))
    assert "no manifest.json" in line and "python -m bootstrap publish" in line
    ok = run_cli(env_for(s3, tmp_path / "m", f"s3://{bucket}/raw/", ALLOW_UNVERIFIED="true"), "pull")
    assert ok.returncode == 0 and (Path(ok.stdout.strip()) / "model.bin").stat().st_size == 1000


def test_fatal_checksum_mismatch_after_retries(s3, published, tmp_path):
    uri, _ = published
    bucket, prefix = uri.split("/")[2], "/".join(uri.split("/")[3:])
    s3.client().put_object(Bucket=bucket, Key=prefix + "audiovae.pth", Body=os.urandom(3 * MB))  # same size
    line = _fatal(run_cli(env_for(s3, tmp_path / "m", uri, PULL_RETRIES=2), "pull"))
    assert "checksum mismatch after 2 attempts for audiovae.pth" in line
    assert not (tmp_path / "m" / "current").exists()
    assert not list((tmp_path / "m").rglob("audiovae.pth"))  # never visible at the final path


def test_fatal_disk_full_is_checked_up_front(s3, published, tmp_path):
    uri, _ = published
    bucket, prefix = uri.split("/")[2], "/".join(uri.split("/")[3:])
    client = s3.client()
    manifest = json.loads(client.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    manifest["files"][0]["size"] = 1 << 50  # a petabyte: no disk here has that
    client.put_object(Bucket=bucket, Key=prefix + "manifest.json", Body=json.dumps(manifest).encode())
    with FaultProxy(s3.endpoint) as proxy:
        line = _fatal(run_cli(env_for(s3, tmp_path / "m", uri, proxy.url), "pull"))
        assert proxy.body_gets() == 0
    assert "disk full" in line and "GB free" in line


def test_fatal_bad_uri_and_oss_without_endpoint(tmp_path):
    assert "is not s3://bucket/prefix/" in _fatal(run_cli({"MODEL_URI": "http://x/y"}, "pull"))
    line = _fatal(run_cli({"MODEL_URI": "oss://bucket/m/", "S3_ENDPOINT_URL": ""}, "pull"))
    assert "S3_ENDPOINT_URL is not set" in line


def test_entrypoint_without_model_uri_hands_off_to_gunicorn(tmp_path):
    """`python -m bootstrap` execs gunicorn; with a bad bind gunicorn itself fails, which proves the hand-off."""
    env = {"MODEL_URI": "", "TTS_ENGINE": "embedded", "BIND": "256.0.0.1:1", "MODELS_DIR": str(tmp_path),
           "PATH": f"{Path(PYTHON).parent}:{os.environ['PATH']}"}
    r = run_cli(env, timeout=120)
    assert "handing off to gunicorn" in r.stderr and "sizing: no GPU visible -> TTS_DEVICE=cpu" in r.stderr
    assert r.returncode != 0  # gunicorn could not bind 256.0.0.1


def test_gpu_sizing_decisions():
    assert parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559\n") == [Gpu("NVIDIA H100 80GB HBM3", 81559 * MB)]
    h100 = decide([Gpu("H100", 80 * GIB)], {})
    assert h100["TTS_DEVICE"] == "cuda" and int(h100["TTS_MAX_BATCH"]) == 64
    small = decide([Gpu("T4", 16 * GIB)], {})
    assert 1 <= int(small["TTS_MAX_BATCH"]) < int(h100["TTS_MAX_BATCH"])
    assert decide([], {})["TTS_DEVICE"] == "cpu"
    forced = decide([Gpu("H100", 80 * GIB)], {"TTS_MAX_BATCH": "4", "TTS_DEVICE": "cuda:1"})
    assert forced["TTS_MAX_BATCH"] == "4" and forced["TTS_DEVICE"] == "cuda:1"
