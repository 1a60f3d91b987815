"""Voices shared across workers (issue 16, 2): the S3 voice store (VOICES_URI) against a real S3 server
(SeaweedFS on loopback). Two stores with their own caches stand for two workers; then two real gunicorn
workers share one bucket prefix."""
import io
import json
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
import requests
import soundfile as sf
from botocore.config import Config

pytest.register_assert_rewrite("tests.support.s3")  # before the import below

from service.voice_storage import STALE_TEMP_S, S3VoiceStorage
from service.errors import ErrorKind
from service.voices import VoiceError, VoiceStore

from .support.procs import free_port
from .support.worker import start_worker

pytest_plugins = ["tests.support.s3"]


def clip(seconds: float = 3.0, rate: int = 22050) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


@pytest.fixture
def voices_uri(s3_server):
    bucket = f"voices-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/shared/voices/"


def worker_store(s3_server, uri: str, cache: Path) -> VoiceStore:
    return VoiceStore(cache, 10 * 2**20, 2.0, 30.0, S3VoiceStorage(uri, cache, s3_server.client(), s3_server.endpoint))


def test_a_voice_stored_by_one_worker_is_found_by_another_and_a_delete_reaches_both(s3_server, voices_uri, tmp_path):
    a = worker_store(s3_server, voices_uri, tmp_path / "a")
    b = worker_store(s3_server, voices_uri, tmp_path / "b")
    voice = a.create("Shared", "What the clip says.", clip())
    assert [v.id for v in b.list()] == [voice.id] and b.list()[0].name == "Shared"
    found = b.get(voice.id)
    assert found is not None and found.transcript == voice.transcript
    # B's engine reads the clip from B's own cache: the same audio A stored.
    assert found.path == tmp_path / "b" / voice.id
    assert (found.path / "audio.wav").read_bytes() == (voice.path / "audio.wav").read_bytes()
    audio, rate = sf.read(found.path / "audio.wav")
    assert rate == 44100 and abs(len(audio) / rate - 3.0) < 0.01

    assert b.delete(voice.id) and not b.delete(voice.id)
    assert a.get(voice.id) is None and a.list() == [] and b.list() == []
    assert not (tmp_path / "a" / voice.id).exists(), "A dropped its cached copy once it saw the delete"
    bucket, prefix = voices_uri[5:].split("/", 1)
    assert s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0) == 0


def test_an_upload_killed_before_it_completes_is_never_listed_and_is_cleaned_up(s3_server, voices_uri, tmp_path):
    client = s3_server.client()
    storage = S3VoiceStorage(voices_uri, tmp_path / "a", client, s3_server.endpoint)
    real_put = client.put_object

    def put_dies_before_the_metadata(**kw):
        if kw["Key"].endswith("voice.json"):
            raise KeyboardInterrupt("killed")  # the process dies between the audio and voice.json
        return real_put(**kw)

    store = VoiceStore(tmp_path / "a", 10 * 2**20, 2.0, 30.0, storage)
    client.put_object = put_dies_before_the_metadata
    with pytest.raises(KeyboardInterrupt):
        store.create("Half", "Never finished.", clip())
    client.put_object = real_put
    other = worker_store(s3_server, voices_uri, tmp_path / "b")
    assert other.list() == [] and store.list() == []
    bucket, prefix = voices_uri[5:].split("/", 1)
    (orphan,) = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    orphan_id = orphan[len(prefix):].split("/")[0]
    assert other.get(orphan_id) is None
    # Young leftovers may be another worker's upload under way: kept. Old ones go.
    assert other.remove_leftovers() == []
    assert other.remove_leftovers(now=time.time() + STALE_TEMP_S + 60) == [orphan_id]
    assert client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0) == 0
    kept = store.create("Whole", "Finished.", clip())
    assert other.remove_leftovers(now=time.time() + STALE_TEMP_S + 60) == [] and other.get(kept.id)


def test_an_unreachable_store_is_a_503_that_says_what_to_check(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    client = boto3.client("s3", endpoint_url=dead, aws_access_key_id="x", aws_secret_access_key="y",
                          region_name="us-east-1", config=Config(retries={"max_attempts": 1}, connect_timeout=2))
    store = VoiceStore(tmp_path, 10 * 2**20, 2.0, 30.0, S3VoiceStorage("s3://b/p/", tmp_path, client, dead))
    with pytest.raises(VoiceError) as e:
        store.get("v_0123456789abcdef")
    assert e.value.kind is ErrorKind.UNAVAILABLE and e.value.retry_after == 5
    assert e.value.code == "voice_store_unavailable"
    assert "VOICES_URI" in str(e.value) and "S3_ENDPOINT_URL" in str(e.value)
    with pytest.raises(ValueError, match="VOICES_URI"):
        S3VoiceStorage("http://not-s3/", tmp_path, client, dead)


def test_a_bad_voices_uri_stops_the_worker_at_start_saying_why(monkeypatch):
    from service.settings import Settings

    with pytest.raises(ValueError, match=r"VOICES_URI 'https://bucket/voices' is not s3://bucket/prefix/"):
        Settings(voices_uri="https://bucket/voices", tts_engine="embedded").check()
    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)
    with pytest.raises(ValueError, match="oss:// but S3_ENDPOINT_URL is not set"):
        Settings(voices_uri="oss://bucket/voices/", tts_engine="embedded").check()
    Settings(voices_uri="s3://bucket/voices/", tts_engine="embedded").check()


def test_two_real_workers_share_voices_through_the_bucket(s3_server, voices_uri, tmp_path):
    env = {**s3_server.env(), "VOICES_URI": voices_uri}
    with start_worker(tmp_path / "w1", {**env, "VOICES_DIR": str(tmp_path / "c1")}) as w1, \
            start_worker(tmp_path / "w2", {**env, "VOICES_DIR": str(tmp_path / "c2")}) as w2:
        # Stored as a VoxCPM worker would (the embedded engine here takes no uploads itself).
        storage = S3VoiceStorage(voices_uri, tmp_path / "c0", s3_server.client(), s3_server.endpoint)
        voice = VoiceStore(tmp_path / "c0", 10 * 2**20, 2.0, 30.0, storage).create("Everywhere", "Hi there.", clip())
        for w in (w1, w2):
            r = requests.get(f"{w.url}/v1/voices/{voice.id}", timeout=10)
            assert r.status_code == 200 and r.json()["name"] == "Everywhere", r.text
            listed = requests.get(f"{w.url}/v1/voices", timeout=10).json()
            assert voice.id in json.dumps(listed)
        assert requests.delete(f"{w2.url}/v1/voices/{voice.id}", timeout=10).status_code in (200, 204)
        r = requests.get(f"{w1.url}/v1/voices/{voice.id}", timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "voice_not_found"
        r = requests.post(f"{w1.url}/tts", json={"text": "hi", "style": voice.id}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "voice_not_found"
