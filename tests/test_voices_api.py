"""Voice uploads over HTTP: validation of every bad case, persistence across a worker restart, no
leftovers of killed uploads, refusal by an engine that cannot clone.

The store is the same whatever the engine; a cloning engine is needed only to accept uploads, so these
run on the timed fake one with SLOW_CLONING=1 (VoxCPM's cloning itself: test_voxcpm_worker.py).
"""
import io
import os
import time

import numpy as np
import pytest
import requests
import soundfile as sf

from .support.worker import SLOW_APP, start_worker

CLONING = {"SLOW_CLONING": "1"}


def clip(seconds=3.0, rate=22050, fmt="WAV", amplitude=0.3):
    t = np.arange(int(rate * seconds)) / rate
    audio = (amplitude * np.sin(2 * np.pi * 160 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([audio, audio], axis=1), rate, format=fmt)  # stereo: the server mono-mixes
    return buf.getvalue()


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("voices-store")


@pytest.fixture(scope="module")
def worker(tmp_path_factory, voices_dir):
    env = {"VOICES_DIR": str(voices_dir), "VOICE_MAX_BYTES": str(1_500_000), "VOICE_MAX_SECONDS": "8", **CLONING}
    with start_worker(tmp_path_factory.mktemp("vw"), env, app=SLOW_APP) as w:
        yield w


def upload(worker, data=None, name="Narrator", text="This is what the clip says.", filename="ref.wav", field="file"):
    """POST /v1/voices; a None name or text leaves that form field out."""
    files = {field: (filename, data if data is not None else clip(), "application/octet-stream")}
    form = {k: v for k, v in (("name", name), ("text", text)) if v is not None}
    return requests.post(f"{worker.url}/v1/voices", files=files, data=form)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_upload_list_get_delete(worker, fmt):
    r = upload(worker, clip(fmt=fmt), name=f"Voice {fmt}")
    assert r.status_code == 201, r.text
    voice = r.json()
    assert voice["id"].startswith("v_") and voice["name"] == f"Voice {fmt}"
    assert abs(voice["duration"] - 3.0) < 0.05 and voice["sample_rate"] == 44100
    listed = requests.get(f"{worker.url}/v1/voices").json()
    assert voice["id"] in [v["id"] for v in listed["voices"] if v["type"] == "uploaded"]
    assert [v["id"] for v in listed["voices"] if v["type"] == "preset"] == ["default"] and listed["supports_cloning"]
    assert requests.get(f"{worker.url}/v1/voices/{voice['id']}").json()["transcript"] == "This is what the clip says."
    # The stored clip, to preview the voice: 16-bit WAV (half the stored float), mono, 44.1 kHz, 3 s.
    audio = requests.get(f"{worker.url}/v1/voices/{voice['id']}/audio")
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
    info = sf.info(io.BytesIO(audio.content))
    assert (info.subtype, info.channels, info.samplerate) == ("PCM_16", 1, 44100) and abs(info.duration - 3.0) < 0.05
    assert requests.delete(f"{worker.url}/v1/voices/{voice['id']}").json() == {"id": voice["id"], "deleted": True}
    assert requests.get(f"{worker.url}/v1/voices/{voice['id']}").status_code == 404
    gone = requests.get(f"{worker.url}/v1/voices/{voice['id']}/audio")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "voice_not_found"


BAD = [
    ("missing file", dict(field="other"), 400, "missing_file"),
    ("not audio", dict(data=b"this is not audio at all" * 100), 415, "unsupported_audio"),
    ("empty file", dict(data=b""), 400, "empty_file"),
    ("too short", dict(data=clip(seconds=1.0)), 400, "bad_duration"),
    ("too long", dict(data=clip(seconds=9.0, rate=8000)), 400, "bad_duration"),
    ("too large", dict(data=clip(seconds=7.9, rate=48000)), 413, "file_too_large"),
    ("silent", dict(data=clip(amplitude=0.0)), 400, "silent_audio"),
    ("no transcript field", dict(text=None), 400, "invalid_transcript"),
    ("empty transcript", dict(text=""), 400, "invalid_transcript"),
    ("blank transcript", dict(text="  \n "), 400, "invalid_transcript"),
    ("control chars in transcript", dict(text="bad\x00text"), 400, "invalid_transcript"),
    ("no name field", dict(name=None), 400, "invalid_name"),
    ("empty name", dict(name=""), 400, "invalid_name"),
    ("blank name", dict(name="   "), 400, "invalid_name"),
    ("name with a newline", dict(name="two\nlines"), 400, "invalid_name"),
    ("long name", dict(name="n" * 65), 400, "invalid_name"),
]


@pytest.mark.parametrize("name,kwargs,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_uploads(worker, name, kwargs, status, code):
    r = upload(worker, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


@pytest.mark.parametrize("voice_id", ["nope", "v_0000000000000000", "..", "v_../../etc", "%2e%2e%2fetc"])
def test_unknown_or_path_like_ids_are_404(worker, voice_id):
    assert requests.get(f"{worker.url}/v1/voices/{voice_id}").status_code == 404
    assert requests.delete(f"{worker.url}/v1/voices/{voice_id}").status_code == 404


def test_names_never_become_paths(worker, voices_dir):
    r = upload(worker, name="../../evil")
    assert r.status_code == 201
    assert not (voices_dir.parent / "evil").exists()
    assert (voices_dir / r.json()["id"] / "audio.wav").exists()


def test_upload_far_over_the_request_limit_is_413(worker):
    # Bigger than the whole request may be (VOICE_MAX_BYTES + multipart allowance): refused before parsing.
    r = upload(worker, data=b"\0" * 3_000_000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_voices_survive_a_restart(tmp_path):
    """Stop the worker, start a new one on the same VOICES_DIR: the voice is still there, usable by id."""
    store = tmp_path / "store"
    with start_worker(tmp_path / "first", {"VOICES_DIR": str(store), **CLONING}, app=SLOW_APP) as first:
        kept = upload(first, name="Survivor").json()
        gone = upload(first, name="Deleted").json()
        assert requests.delete(f"{first.url}/v1/voices/{gone['id']}").status_code == 200
    with start_worker(tmp_path / "second", {"VOICES_DIR": str(store), **CLONING}, app=SLOW_APP) as again:
        got = requests.get(f"{again.url}/v1/voices/{kept['id']}")
        assert got.status_code == 200 and got.json() == kept
        uploaded = [v["id"] for v in requests.get(f"{again.url}/v1/voices").json()["voices"] if v["type"] == "uploaded"]
        assert uploaded == [kept["id"]]
        assert requests.get(f"{again.url}/v1/voices/{gone['id']}").status_code == 404
    assert sorted(p.name for p in store.iterdir()) == [kept["id"]]  # no half-written or half-deleted voices


def test_concurrent_deletes_of_one_voice_one_wins_the_rest_404(worker):
    from concurrent.futures import ThreadPoolExecutor

    voice_id = upload(worker, name="Raced").json()["id"]
    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(lambda _: requests.delete(f"{worker.url}/v1/voices/{voice_id}").status_code, range(8)))
    assert codes == [200] + [404] * 7
    assert requests.get(f"{worker.url}/v1/voices/{voice_id}").status_code == 404


def test_leftovers_of_killed_uploads_and_deletes_are_removed_at_start(tmp_path):
    """A process killed mid-upload leaves `.tmp-*`, mid-delete `.del-*`: the next start removes them, except
    an upload young enough to be another worker's on the same volume (a rollout runs two)."""
    store = tmp_path / "store"
    with start_worker(tmp_path / "first", {"VOICES_DIR": str(store), **CLONING}, app=SLOW_APP) as first:
        kept = upload(first, name="Kept").json()
    old = time.time() - 3600
    for name in (".tmp-v_00000000000000aa", ".del-v_00000000000000bb-1234abcd", ".tmp-v_00000000000000cc"):
        (store / name).mkdir()
        (store / name / "audio.wav").write_bytes(b"half a file")
        if name != ".tmp-v_00000000000000cc":
            os.utime(store / name, (old, old))
    with start_worker(tmp_path / "second", {"VOICES_DIR": str(store), **CLONING}, app=SLOW_APP) as again:
        listed = [v["id"] for v in requests.get(f"{again.url}/v1/voices").json()["voices"] if v["type"] == "uploaded"]
        assert listed == [kept["id"]]
        assert "removed 2 leftovers" in again.log_text()
    assert sorted(p.name for p in store.iterdir()) == [".tmp-v_00000000000000cc", kept["id"]]


def test_a_voice_is_durable_once_created_and_gone_once_deleted(tmp_path, monkeypatch):
    """The files, the temporary directory's entries and the rename into the store are all fsynced
    before the upload is answered (a power loss must neither lose the voice nor keep half of it);
    the rename of a delete is fsynced too."""
    from service.voices import VoiceStore

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = VoiceStore(tmp_path / "store", 1_500_000, 2.0, 8.0)
    data = clip()
    voice = store.create("Durable", "What the clip says.", data)
    tmp = str(tmp_path / "store" / f".tmp-{voice.id}")
    assert sorted(synced[:2]) == [f"{tmp}/audio.wav", f"{tmp}/voice.json"], synced  # the files, in any order
    assert synced[2:] == [tmp, str(tmp_path / "store")], synced  # then their names, then the rename
    synced.clear()
    assert store.delete(voice.id)
    assert synced == [str(tmp_path / "store")]


def test_an_engine_that_cannot_clone_refuses_uploads_and_says_what_to_do(tmp_path):
    """The embedded engine takes no uploads (they could never be used). Voices a VoxCPM deployment left on
    the same volume are still listed, and using one says why it cannot be."""
    from service.voices import VoiceStore

    store = tmp_path / "store"
    earlier = VoiceStore(store, 1_500_000, 2.0, 8.0).create("From VoxCPM days", "What the clip says.", clip())
    with start_worker(tmp_path, {"VOICES_DIR": str(store)}) as embedded:
        r = upload(embedded)
        assert r.status_code == 400 and r.headers["Content-Type"] == "application/json"
        err = r.json()["error"]
        assert err["code"] == "cloning_not_supported" and "TTS_ENGINE=voxcpm" in err["message"]
        assert "joe" in err["message"]  # the presets it can use instead
        listed = requests.get(f"{embedded.url}/v1/voices").json()
        assert listed["supports_cloning"] is False
        assert [v["id"] for v in listed["voices"] if v["type"] == "uploaded"] == [earlier.id]
        assert requests.get(f"{embedded.url}/info").json()["engine"]["supports_cloning"] is False
        for path, body in (("/tts", {"text": "hi", "style": earlier.id}),
                           ("/v1/audio/speech", {"input": "hi", "voice": earlier.id, "response_format": "wav"}),
                           ("/v1/audio/speech", {"input": "hi", "voice": earlier.id, "response_format": "pcm",
                                                 "stream": True})):
            r = requests.post(f"{embedded.url}{path}", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "voice_not_supported", (path, r.text)
            assert "cannot clone" in r.json()["error"]["message"]
    assert sorted(p.name for p in store.iterdir()) == [earlier.id]  # the refused upload stored nothing
