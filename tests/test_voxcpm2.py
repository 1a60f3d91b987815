"""VoxCPM2 (service/engines/voxcpm/voxcpm2.py) on a tiny random-weight checkpoint, through the package's own
model code: what the model is given for each mode (voice design from `instructions`, the three ways to clone,
a text starting with a bracket), and a real worker serving it next to a VoxCPM-1.5 model on every endpoint.
Random weights make noise, not speech: these tests check rates, lengths, plumbing and the model's input."""
import base64
import io
import json

import numpy as np
import pytest
import requests
import soundfile as sf
import websocket

from service.engines import CloneMode, Continuation, SynthesisParams, UnsupportedRequest, VoicePrompt
from service.engines.voxcpm.control import as_spoken, control_prefix
from service.engines.voxcpm.voxcpm2 import LANGUAGES, VoxCPM2Engine
from service.settings import Settings

from .support.voxcpm_checkpoint import V2_TOKEN_HOP, build_checkpoint
from .support.worker import start_worker, ws_collect

REF, CONT, BOTH = (m.value for m in (CloneMode.REFERENCE, CloneMode.CONTINUATION, CloneMode.REFERENCE_CONTINUATION))


def _clip(path=None, seconds=2.5, rate=22050):
    t = np.arange(int(seconds * rate)) / rate
    audio = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    buf = path or io.BytesIO()
    sf.write(buf, audio, rate, format="WAV")
    return buf if path else buf.getvalue()


@pytest.fixture(scope="module")
def v2_checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("v2") / "voxcpm2-tiny", size="tiny", seed=0, family="voxcpm2")


# -- the control prefix ----------------------------------------------------------------------------
@pytest.mark.parametrize("text, spoken", [
    ("(laughs) Hello there.", "laughs, Hello there."),
    ("  (A quiet aside.) Then the rest.", "A quiet aside. Then the rest."),
    ("（笑）你好。", "笑, 你好。"),
    ("((nested)) words", "nested, words"),
    ("( ) words", "words"),
    ("(never closed", "never closed"),
    ("Brackets (inside) stay.", "Brackets (inside) stay."),
])
def test_text_never_starts_with_a_bracket(text, spoken):
    assert as_spoken(text) == spoken


def test_instructions_are_one_bracketed_group():
    assert control_prefix("  a calm older woman,\n slow pace ") == "(a calm older woman, slow pace)"
    # A bracket inside would close the prefix early and leave the rest to be read aloud.
    assert control_prefix("warm (but tired) voice) now say this") == "(warm but tired voice now say this)"
    assert control_prefix(None) == control_prefix("  ") == ""


# -- what the model is given ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(v2_checkpoint):
    """The engine on the tiny checkpoint; `engine.given` records what each generation received (the
    package's own method still runs: the record is taken on the way in)."""
    eng = VoxCPM2Engine(model_dir=v2_checkpoint, device="cpu", max_len=12, inference_timesteps=2)
    eng.load()
    real = eng._model._generate_with_prompt_cache
    eng.given = []

    def recorded(**kwargs):
        cache = kwargs["prompt_cache"]
        eng.given.append({"text": kwargs["target_text"], "mode": cache and cache["mode"],
                          "prompt_text": cache and cache.get("prompt_text"),
                          "has_reference": bool(cache and "ref_audio_feat" in cache),
                          "ref_frames": cache["ref_audio_feat"].shape[0] if cache and "ref_audio_feat" in cache else 0,
                          "has_continuation": bool(cache and "audio_feat" in cache)})
        return real(**kwargs)

    eng._model._generate_with_prompt_cache = recorded
    return eng


@pytest.fixture(scope="module")
def voice(engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("voice") / "audio.wav"
    _clip(path, rate=16000)
    return VoicePrompt("v_0123456789abcdef", path, "(Sighs) This is my voice.", engine.voice_modes("x"))


def _given(engine, text, prompt=None, carry=None, frames=False, **params):
    """What the model was given for one chunk (`frames`: with the reference's length in latent frames)."""
    audio = engine.synthesize(text, "default", prompt, SynthesisParams(seed=1, **params), carry)
    assert audio.size > 0 and audio.size % V2_TOKEN_HOP == 0 and np.isfinite(audio).all()
    given = dict(engine.given[-1])
    return given if frames else {k: v for k, v in given.items() if k != "ref_frames"}


def test_the_engine_is_voxcpm2_at_48k(engine):
    info = engine.info()
    assert (info.name, info.sample_rate, info.voice_sample_rate, info.token_rate) == ("voxcpm2", 48000, 16000, 6.25)
    assert info.supports_instructions and info.languages == LANGUAGES and len(LANGUAGES) == 30
    assert info.clone_modes[0] == BOTH


def test_voice_design_puts_the_instructions_in_front(engine):
    given = _given(engine, "Good evening.", instructions="a calm older woman, slow pace")
    assert given == {"text": "(a calm older woman, slow pace)Good evening.", "mode": None, "prompt_text": None,
                     "has_reference": False, "has_continuation": False}


@pytest.mark.parametrize("instructions", [None, "whisper"])
def test_a_text_starting_with_a_bracket_is_spoken_not_obeyed(engine, instructions):
    given = _given(engine, "(a deep male voice) is what the sign said.", instructions=instructions)
    prefix = f"({instructions})" if instructions else ""
    assert given["text"] == prefix + "a deep male voice, is what the sign said."
    # Streaming (the WebSocket's and stream=true's path) gives the model the same.
    list(engine.stream("(a deep male voice) again.", "default", None, SynthesisParams(seed=1)))
    assert engine.given[-1]["text"] == "a deep male voice, again."


@pytest.mark.parametrize("mode, text, prompt_text, reference, continuation", [
    (REF, "(whisper)Cloned.", None, True, False),
    (BOTH, "Cloned.", "(whisper)Sighs, This is my voice.", True, True),
])
def test_instructions_steer_a_cloned_voice(engine, voice, mode, text, prompt_text, reference, continuation):
    given = _given(engine, "Cloned.", voice, instructions="whisper", clone_mode=mode)
    assert given == {"text": text, "mode": {REF: "reference", BOTH: "ref_continuation"}[mode],
                     "prompt_text": prompt_text, "has_reference": reference, "has_continuation": continuation}


def test_continuation_alone_uses_the_transcript_and_refuses_instructions(engine, voice):
    given = _given(engine, "(Cloned.)", voice, clone_mode=CONT)
    assert given == {"text": "Cloned.", "mode": "continuation", "prompt_text": "Sighs, This is my voice.",
                     "has_reference": False, "has_continuation": True}
    with pytest.raises(UnsupportedRequest, match="clone_mode 'reference_continuation' or 'reference'") as e:
        engine.check(voice, SynthesisParams(instructions="whisper", clone_mode=CONT))
    assert e.value.code == "instructions_not_supported"
    assert _given(engine, "Default mode.", voice)["mode"] == "ref_continuation"  # a voice's first mode


def test_a_voice_without_transcript_is_a_reference_only(engine, voice):
    assert engine.voice_modes("  ") == (REF,)
    bare = VoicePrompt("v_fedcba9876543210", voice.wav_path, "", engine.voice_modes(""))
    assert _given(engine, "Hi.", bare)["mode"] == "reference"
    with pytest.raises(UnsupportedRequest, match="has no transcript"):
        engine.check(bare, SynthesisParams(clone_mode=BOTH))


def test_the_normaliser_runs_for_the_languages_it_knows(engine):
    assert _given(engine, "I have 3 cats.", normalize=True, lang="en")["text"] == "I have three cats."
    assert _given(engine, "J'ai 3 chats.", normalize=True, lang="fr")["text"] == "J'ai 3 chats."


def test_tts_engine_voxcpm2_serves_a_checkpoint_alone(v2_checkpoint):
    [spec] = Settings(tts_engine="voxcpm2", model_dir=v2_checkpoint).model_specs
    assert (spec.name, spec.engine) == ("voxcpm2", "voxcpm2")


# -- a worker serving VoxCPM2 (default) and VoxCPM-1.5 side by side ----------------------------------
@pytest.fixture(scope="module")
def worker(v2_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("side-by-side")
    v15 = build_checkpoint(root / "voxcpm15-tiny", size="tiny", seed=1)
    knobs = {"inference_timesteps": 2, "max_len": 16}
    models = [{"name": "vox2", "dir": str(v2_checkpoint), "default": True, "settings": knobs},
              {"name": "vox15", "dir": str(v15), "settings": knobs}]
    env = {"MODELS": json.dumps(models), "TTS_DEVICE": "cpu", "QUEUE_SIZE": "2", "CROSSFADE_MS": "0"}
    with start_worker(root / "run", env) as w:
        yield w


def _tts(worker, **body):
    r = requests.post(f"{worker.url}/tts", json={"text": "Hello from VoxCPM2.", "seed": 2, **body})
    assert r.status_code == 200, r.text
    audio, rate = sf.read(io.BytesIO(base64.b64decode(r.json()["audio_base64"])), dtype="float32")
    assert rate == r.json()["sample_rate"] and audio.size > 0 and np.isfinite(audio).all()
    return audio, rate


def test_models_list_each_familys_rate_languages_and_instructions(worker):
    by_id = {m["id"]: m for m in requests.get(f"{worker.url}/v1/models").json()["data"]}
    v2, v15 = by_id["vox2"], by_id["vox15"]
    assert (v2["family"], v2["sample_rate"], v2["default_sample_rate"]) == ("voxcpm2", 48000, 48000)
    assert (v15["family"], v15["sample_rate"], v15["default_sample_rate"]) == ("voxcpm", 44100, 44100)
    assert v2["supports_instructions"] is True and v15["supports_instructions"] is False
    assert len(v2["languages"]) == 30 and v15["languages"] == ["en", "zh"]
    assert v2["clone_modes"] == [BOTH, REF, CONT] and v15["clone_modes"] == [CONT]
    assert 48000 in v2["sample_rates"] and 44100 in v15["sample_rates"]
    info = requests.get(f"{worker.url}/info").json()
    assert info["limits"]["default_sample_rate"] == 48000  # the default model's


def test_tts_is_48k_in_whole_tokens_and_resampled_on_request(worker):
    audio, rate = _tts(worker)
    assert rate == 48000 and audio.size % V2_TOKEN_HOP == 0
    low, low_rate = _tts(worker, sample_rate=16000)
    assert low_rate == 16000 and low.size * 3 == audio.size  # same seed, same tokens, a third of the samples
    v15, v15_rate = _tts(worker, model="vox15")
    assert v15_rate == 44100 and v15.size % (4 * 1764) == 0


def test_speech_designs_a_voice_and_streams_at_48k(worker):
    r = requests.post(f"{worker.url}/v1/audio/speech", json={
        "input": "A designed voice.", "instructions": "a cheerful young man", "response_format": "wav"})
    assert r.status_code == 200, r.text
    audio, rate = sf.read(io.BytesIO(r.content))
    assert rate == 48000 and r.headers["X-Sample-Rate"] == "48000" and audio.size % V2_TOKEN_HOP == 0
    with requests.post(f"{worker.url}/v1/audio/speech", stream=True, json={
            "input": "(sotto voce) streamed.", "instructions": "whisper", "response_format": "pcm", "stream": True,
            "sample_rate": 24000}) as s:
        assert s.status_code == 200 and s.headers["X-Sample-Rate"] == "24000"
        samples = sum(len(c) for c in s.iter_content(chunk_size=None)) // 2
    assert samples > 0 and samples % (V2_TOKEN_HOP // 2) == 0


def test_websocket_streams_48k_with_instructions(worker):
    ws = websocket.create_connection(worker.ws_url, timeout=120)
    try:
        for rate in (None, 16000):
            ws.send(json.dumps({"text": "Over a socket.", "instructions": "an excited child", "lang": "en",
                                **({"sample_rate": rate} if rate else {})}))
            header, chunks, final = ws_collect(ws)
            assert final["type"] == "done", final
            assert header["sample_rate"] == (rate or 48000) and chunks
            samples = sum(len(c) for _, c in chunks) // 2
            assert samples % (V2_TOKEN_HOP * (rate or 48000) // 48000) == 0
    finally:
        ws.close()


def test_languages_are_the_models(worker):
    assert _tts(worker, text="Bonjour tout le monde.", lang="fr")[1] == 48000
    assert _tts(worker, text="こんにちは、世界。", lang="ja")[1] == 48000
    r = requests.post(f"{worker.url}/tts", json={"text": "Bonjour.", "lang": "fr", "model": "vox15"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_language"
    assert "speaks en, zh only" in r.json()["error"]["message"]
    r = requests.post(f"{worker.url}/tts", json={"text": "Hello.", "lang": "xx"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_language"


def _upload(worker, text, model="vox2"):
    r = requests.post(f"{worker.url}/v1/voices", data={"name": "Ann", "text": text, "model": model},
                      files={"file": ("clip.wav", _clip(), "audio/wav")})
    assert r.status_code == 201, r.text
    return r.json()


def test_uploaded_voices_clone_in_each_mode(worker):
    voice = _upload(worker, "This is my reference voice.")
    assert (voice["family"], voice["sample_rate"], voice["modes"]) == ("voxcpm2", 16000, [BOTH, REF, CONT])
    stored, rate = sf.read(io.BytesIO(requests.get(f"{worker.url}/v1/voices/{voice['id']}/audio").content))
    assert rate == 16000 and abs(stored.size / rate - 2.5) < 0.01
    for mode in (None, BOTH, REF, CONT):
        audio, rate = _tts(worker, style=voice["id"], **({"clone_mode": mode} if mode else {}))
        assert rate == 48000
    for mode in (BOTH, REF):
        _tts(worker, style=voice["id"], clone_mode=mode, instructions="speak slowly")
    # The 1.5 model cannot use a VoxCPM2 voice, and says so.
    r = requests.post(f"{worker.url}/tts", json={"text": "Hi.", "style": voice["id"], "model": "vox15"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "voice_model_mismatch"


def test_continuation_alone_refuses_instructions_with_what_to_do(worker):
    voice = _upload(worker, "This is my reference voice.")
    body = {"style": voice["id"], "clone_mode": CONT, "instructions": "speak slowly"}
    r = requests.post(f"{worker.url}/tts", json={"text": "Hi.", **body})
    assert r.status_code == 400 and r.json()["error"]["code"] == "instructions_not_supported"
    assert "send clone_mode 'reference_continuation' or 'reference'" in r.json()["error"]["message"]
    r = requests.post(f"{worker.url}/v1/audio/speech", json={"input": "Hi.", "voice": voice["id"],
                                                              "clone_mode": CONT, "instructions": "speak slowly"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "instructions_not_supported"


def test_a_voice_without_transcript_clones_as_a_reference_only(worker):
    voice = _upload(worker, "")
    assert voice["modes"] == [REF]
    assert _tts(worker, style=voice["id"], instructions="speak slowly")[1] == 48000
    r = requests.post(f"{worker.url}/tts", json={"text": "Hi.", "style": voice["id"], "clone_mode": BOTH})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_clone_mode"
    assert "reference only" in r.json()["error"]["message"]
    r = requests.post(f"{worker.url}/tts", json={"text": "Hi.", "clone_mode": REF})
    assert r.status_code == 400 and r.json()["error"]["code"] == "clone_mode_without_voice"


def test_voice_carry_keeps_the_reference_and_continues_the_previous_chunk(engine, voice):
    """Chunk k+1 continues chunk k's tail (its audio and words), after the reference: the voice's clip (2.5 s:
    16 latent frames), or without a voice the tail itself (1 s: 7 frames); instructions stay in front."""
    t = np.arange(48000) / 48000
    tail = Continuation((0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), "(Softly) the previous words.")
    carried = "(whisper)Softly, the previous words. "
    alone = _given(engine, "Next.", carry=tail, frames=True, instructions="whisper")
    assert alone == {"text": "Next.", "mode": "ref_continuation", "prompt_text": carried, "has_reference": True,
                     "has_continuation": True, "ref_frames": 7}
    for mode in (BOTH, REF):
        cloned = _given(engine, "Next.", voice, carry=tail, frames=True, instructions="whisper", clone_mode=mode)
        assert cloned == {**alone, "ref_frames": 16}, mode
    # A voice used in continuation alone wins over the carry, as on VoxCPM-1.5.
    assert _given(engine, "Next.", voice, carry=tail, clone_mode=CONT)["prompt_text"] == "Sighs, This is my voice."
    assert engine.supports_carry


def test_a_carried_tail_is_encoded_only_as_what_the_chunk_uses(engine, voice, monkeypatch):
    """Each VAE encode holds up every row of a batch: the tail is encoded as a continuation prompt beside a
    voice's reference (not as a reference too), and not at all when the voice's clip alone is continued."""
    tail = Continuation(np.full(48000, 0.1, dtype=np.float32), "the previous words.")
    _given(engine, "Next.", voice)  # the voice's own prompts, cached from here on
    encodes = []
    real = engine._latents
    monkeypatch.setattr(engine, "_latents", lambda *a, **kw: (encodes.append(kw.get("pad_left", True)),
                                                                real(*a, **kw))[1])
    expected = {None: [False, True], BOTH: [True], REF: [True], CONT: []}  # pad_left of each encode
    for mode, want in expected.items():
        encodes.clear()
        _given(engine, "Next.", None if mode is None else voice, carry=tail, clone_mode=mode)
        assert encodes == want, mode

