"""bootstrap's small parts with fake inputs: GPU sizing, URIs, manifests, settings, status, hand-off."""
import json
import os
import stat
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.support.s3")  # before the import below

from bootstrap import manifest as mf
from bootstrap.errors import FatalError
from bootstrap.gpu import GIB, Gpu, decide, parse_nvidia_smi
from bootstrap.settings import BootstrapSettings
from bootstrap.status import Status
from bootstrap.uri import parse_uri

from .support.procs import PYTHON
from .support.s3 import MB, run_bootstrap


def test_gpu_sizing_leaves_the_batch_to_the_engine_and_threads_for_it(monkeypatch):
    """bootstrap sizes threads and queue only; the engine picks the batch after loading the model
    (TTS_MAX_BATCH=auto), capped by what the threads can carry: room for 128 on a GPU, and what
    bootstrap exports must pass the worker's own start-up check (threads >= queue + batch + ...)."""
    from service.settings import Settings

    assert parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559\nTesla T4, 15360\n") == [
        Gpu("NVIDIA H100 80GB HBM3", 81559 * MB), Gpu("Tesla T4", 15360 * MB)]
    assert parse_nvidia_smi("") == [] and parse_nvidia_smi("garbage\n") == []
    for name in ("GUNICORN_THREADS", "QUEUE_SIZE", "WS_MAX_CONNECTIONS", "TTS_MAX_BATCH"):
        monkeypatch.delenv(name, raising=False)

    def worker_settings(chosen: dict) -> Settings:
        s = Settings(**{k.lower(): v for k, v in chosen.items()})
        s.check()  # raises if the worker would refuse to start
        return s

    for gpu in (Gpu("H100", 80 * GIB), Gpu("T4", 16 * GIB), Gpu("small", 2 * GIB)):
        chosen = decide([gpu], {})
        assert chosen["TTS_DEVICE"] == "cuda" and "TTS_MAX_BATCH" not in chosen
        assert worker_settings(chosen).batch_capacity >= 128
    cpu = decide([], {})
    assert cpu["TTS_DEVICE"] == "cpu" and "TTS_MAX_BATCH" not in cpu
    assert worker_settings(cpu).batch_capacity >= 1


def test_gpu_sizing_explicit_settings_win_and_auto_means_choose():
    forced = decide([Gpu("H100", 80 * GIB)], {"TTS_DEVICE": "cuda:1", "QUEUE_SIZE": "7", "GUNICORN_THREADS": "40"})
    assert forced["TTS_DEVICE"] == "cuda:1" and forced["QUEUE_SIZE"] == "7" and forced["GUNICORN_THREADS"] == "40"
    auto = decide([Gpu("H100", 80 * GIB)], {"TTS_DEVICE": "auto", "QUEUE_SIZE": "", "GUNICORN_THREADS": "auto"})
    assert auto == decide([Gpu("H100", 80 * GIB)], {})
    assert decide([], {"TTS_DEVICE": "cuda"})["TTS_DEVICE"] == "cuda"  # the operator knows better


def test_gpu_detection_asks_nvidia_smi_without_importing_torch(tmp_path, monkeypatch):
    import sys

    from bootstrap import gpu

    # A stand-in nvidia-smi (this machine has no GPU) that records its arguments.
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/args\necho 'NVIDIA A10G, 23028'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch would raise: it must not be needed
    assert gpu.detect_gpus({}) == [Gpu("NVIDIA A10G", 23028 * MB)]
    assert gpu.detect_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == [Gpu("NVIDIA A10G", 23028 * MB)]
    assert (tmp_path / "args").read_text().splitlines()[1].endswith("--id=2")  # the GPU torch calls cuda:0
    assert gpu.detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []  # every GPU hidden from CUDA


def test_uri_parsing():
    assert str(parse_uri("s3://bucket/a/b", None)) == "s3://bucket/a/b/"
    assert parse_uri("s3://bucket", None).key("x.bin") == "x.bin"
    assert parse_uri("oss://b/m/", "https://oss-cn-hangzhou.aliyuncs.com").key("w.pt") == "m/w.pt"
    for bad in ("http://b/x", "s3:///x", "bucket/x", ""):
        with pytest.raises(FatalError, match="is not s3://bucket/prefix/"):
            parse_uri(bad, None)
    with pytest.raises(FatalError, match="S3_ENDPOINT_URL"):
        parse_uri("oss://b/m/", None)
    for bad in ("s3://b/m/?versionId=1", "s3://b/m/#v2"):  # would be dropped from the key silently
        with pytest.raises(FatalError, match="'\\?' or '#'"):
            parse_uri(bad, None)
    with pytest.raises(FatalError, match="the publish URI 'http://x/'"):
        parse_uri("http://x/", None, what="the publish URI")


def test_manifest_build_parse_and_canonical_digest(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"a" * 10)
    (tmp_path / "sub" / "b.json").write_text("{}")
    (tmp_path / ".hidden").write_text("skip me")
    m = mf.build(tmp_path, "voxcpm", "v1")
    assert [(f.path, f.size) for f in m.files] == [("a.bin", 10), ("sub/b.json", 2)]
    assert m.total_bytes == 12 and len(m.digest) == 64
    doc = json.loads(m.raw)
    assert set(doc) == {"name", "version", "created", "files"}
    # Whitespace and key order do not change the version's identity; content does.
    assert mf.parse(json.dumps(doc).encode()).digest == m.digest
    doc["files"][0]["size"] = 11
    assert mf.parse(json.dumps(doc).encode()).digest != m.digest
    for bad_path in ("../etc/passwd", "/abs", ".voxbox/status.json"):
        with pytest.raises(FatalError, match="unsafe path"):
            mf.parse(json.dumps({"files": [{"path": bad_path, "size": 1, "sha256": "0"}]}).encode())
    with pytest.raises(FatalError, match="malformed"):
        mf.parse(b"not json")


def test_settings_defaults_and_env(monkeypatch):
    for name in BootstrapSettings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    s = BootstrapSettings()
    assert s.models_dir == Path("/models") and s.verify == "fast" and s.keep_versions == 2
    assert s.status_path == Path("/models/.voxbox/status.json") and not s.allow_unverified
    monkeypatch.setenv("MODELS_DIR", "/vol")
    monkeypatch.setenv("PULL_CONCURRENCY", "4")
    monkeypatch.setenv("ALLOW_UNVERIFIED", "true")
    monkeypatch.setenv("S3_ADDRESSING_STYLE", "virtual")
    s = BootstrapSettings()
    assert s.status_path == Path("/vol/.voxbox/status.json") and s.pull_concurrency == 4 and s.allow_unverified
    monkeypatch.setenv("STATUS_FILE", "/run/status.json")
    assert BootstrapSettings().status_path == Path("/run/status.json")


def test_status_file_is_replaced_atomically(tmp_path):
    st = Status(tmp_path / "deep" / "status.json")
    st.update(phase="downloading", bytes_done=5, bytes_total=10)
    st.fail("boom")
    doc = json.loads((tmp_path / "deep" / "status.json").read_text())
    assert doc["phase"] == "failed" and doc["error"] == "boom" and doc["bytes_done"] == 5
    assert set(doc) == {"phase", "bytes_done", "bytes_total", "error", "model", "digest", "updated_at"}
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["status.json"]  # no temp files left


def test_entrypoint_without_model_uri_hands_off_to_gunicorn(tmp_path):
    """`python -m bootstrap` execs gunicorn; with a bad bind gunicorn itself fails, which proves the hand-off."""
    env = {"MODEL_URI": "", "TTS_ENGINE": "embedded", "BIND": "256.0.0.1:1", "MODELS_DIR": str(tmp_path),
           "TTS_MAX_BATCH": "auto", "PATH": f"{Path(PYTHON).parent}:{os.environ['PATH']}"}
    r = run_bootstrap(env, timeout=120)
    assert "handing off to gunicorn" in r.stderr and "sizing: no GPU visible -> TTS_DEVICE=cpu" in r.stderr
    sizing = next(line for line in r.stderr.splitlines() if "sizing:" in line)
    assert "GUNICORN_THREADS=" in sizing and "TTS_MAX_BATCH" not in sizing  # the engine picks the batch
    assert r.returncode != 0  # gunicorn could not bind 256.0.0.1
    assert json.loads((tmp_path / ".voxbox" / "status.json").read_text())["phase"] == "ready"


def test_hashing_sink_follows_out_of_order_and_repeated_writes(tmp_path):
    """The download target hashes ranged parts arriving in any order, and retried ones twice."""
    import hashlib
    import random

    from bootstrap.puller import _HashingSink

    rng = random.Random(7)
    body = rng.randbytes(3 * MB + 12345)
    pieces = [(o, body[o:o + 300_000]) for o in range(0, len(body), 300_000)]
    order = pieces[:]
    rng.shuffle(order)
    order += [pieces[0], pieces[3]]  # retried parts rewrite the same bytes
    odd = [(100, body[100:200_000])]  # a part starting inside another one
    sink = _HashingSink(tmp_path / "x.part")
    for offset, data in odd + order:
        sink.seek(offset)
        sink.write(data)
    assert sink.finish() == hashlib.sha256(body).hexdigest() and sink.size == len(body)
    assert (tmp_path / "x.part").read_bytes() == body


def test_write_out_starts_while_the_download_goes_on(tmp_path, monkeypatch):
    """Dirty pages are handed to the disk every few MB, so the fsync before the rename is short."""
    from bootstrap import puller, writeback

    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * MB)
        assert writeback.start_writeback(f.fileno())  # Linux: sync_file_range is there and accepts it
    assert not writeback.start_writeback(10_000)  # a bad fd is reported, not raised

    started = []
    monkeypatch.setattr(puller, "start_writeback", lambda fd: started.append(fd) or True)
    sink = puller._HashingSink(tmp_path / "y.part")
    chunk = b"y" * (puller._WRITEBACK_BYTES // 4)
    for i in range(9):
        sink.seek(i * len(chunk))
        sink.write(chunk)
    sink.finish()
    assert len(started) == 2  # after 8 and after 16 of the 9 quarter-steps


def test_compile_caches_live_on_the_models_volume_per_torch_gpu_and_model(tmp_path):
    import importlib.metadata

    from bootstrap.compile_cache import compile_cache_env, prune_compile_caches
    from bootstrap.gpu import Gpu

    h200 = [Gpu("NVIDIA H200", 141 << 30)]
    env = compile_cache_env(tmp_path, str(tmp_path / "versions" / ("a" * 64)), h200, {})
    torch_version = importlib.metadata.version("torch")
    key = f"torch-{torch_version}_NVIDIA-H200_{'a' * 16}"
    assert env == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile-cache" / key / "inductor"),
                   "TRITON_CACHE_DIR": str(tmp_path / "compile-cache" / key / "triton")}
    other_gpu = compile_cache_env(tmp_path, str(tmp_path / "versions" / ("a" * 64)), [Gpu("NVIDIA L4", 24 << 30)], {})
    assert other_gpu["TRITON_CACHE_DIR"] != env["TRITON_CACHE_DIR"]
    # An operator's own setting wins; no GPU or no pulled model: nothing to keep.
    assert "TRITON_CACHE_DIR" not in compile_cache_env(tmp_path, "/m/v", h200, {"TRITON_CACHE_DIR": "/x"})
    assert compile_cache_env(tmp_path, str(tmp_path / "v"), [], {}) == {}
    assert compile_cache_env(tmp_path, None, h200, {}) == {}
    # Pruning a model version takes its caches with it, and only its.
    for digest in ("a" * 64, "b" * 64):
        folder = tmp_path / "compile-cache" / f"torch-{torch_version}_NVIDIA-H200_{digest[:16]}" / "inductor"
        folder.mkdir(parents=True)
    gone = prune_compile_caches(tmp_path, {"b" * 64})
    assert [p.name.rsplit("_", 1)[-1] for p in gone] == ["a" * 16]
    assert [p.name.rsplit("_", 1)[-1] for p in (tmp_path / "compile-cache").iterdir()] == ["b" * 16]
