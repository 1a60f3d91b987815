"""Voice carry on the real VoxCPM-1.5 model code (a tiny random checkpoint), serial and batched: the
second chunk's generation is given, as its prompt features, the VAE encoding of the first chunk's tail
(exactly what the same audio gives as an uploaded voice), and a request voice wins over the carry.

A tiny random model decodes nearly the same audio for every text, so which chunk a tail was cut from is
told here by its words (and proven on distinct audio with the fake engine: tests/test_voice_carry.py)."""
import numpy as np
import pytest
import soundfile as sf
import torch

from service.engines import SynthesisParams, VoicePrompt
from service.engines.voxcpm.batch import BatchedGenerator
from service.engines.voxcpm.engine import VoxCPMEngine
from service.metrics import Metrics
from service.scheduler import Job, Scheduler

from .support.jobs import sentence_audio
from .support.voxcpm_checkpoint import build_checkpoint

SENTENCES = ["The first chunk of a longer text.", "And the second one follows.", "A third."]
BOUND_S = 0.5  # under a chunk's audio (7 to 24 tokens, 1.1 to 3.84 s here), so the tail is really cut


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("carry") / "tiny", size="tiny", seed=3, dtype="float32")


@pytest.fixture(params=["serial", "batched"])
def served(request, checkpoint, monkeypatch):
    """A scheduler on the engine, and every prompt cache a generation was given, in order: the
    package's own loop (serial) or the batch's joins (batched)."""
    serial = request.param == "serial"
    engine = VoxCPMEngine(checkpoint, device="cpu", compile_mode="off", inference_timesteps=2, max_len=24,
                          serial=serial)
    given = []
    if serial:
        engine.load()
        for name in ("generate_with_prompt_cache_streaming", "generate_with_prompt_cache"):
            real = getattr(engine._model, name)
            monkeypatch.setattr(engine._model, name, lambda *a, real=real, **kw: (
                given.append((kw["target_text"], kw["prompt_cache"])), real(*a, **kw))[1])
        engine.load = lambda: None  # loaded above, so the package's loop could be watched
    else:
        real_add = BatchedGenerator.add_many
        monkeypatch.setattr(BatchedGenerator, "add_many", lambda self, joins: (
            given.extend((j.text, j.prompt_cache) for j in joins), real_add(self, joins))[1])
    s = Scheduler(engine, Metrics().for_model("test"), queue_size=2, retry_after_s=1, warmup=False,
                  max_batch="1" if serial else "2", batch_cap=2, carry_s=BOUND_S)
    s.start()
    assert s.loaded.wait(120) and s.ready, s.error
    yield engine, s, given
    s.stop()


def run(s, prompt=None):
    return sentence_audio(s.submit(Job(sentences=SENTENCES, preset="default", prompt=prompt,
                                       params=SynthesisParams(seed=4), stream=True, timeout_s=120)))


def as_voice(engine, audio, text, path):
    """The prompt cache the engine builds for `audio` uploaded as a voice (float WAV: the same samples)."""
    sf.write(path, audio, engine.sample_rate, subtype="FLOAT")
    return engine._encode_prompt(VoicePrompt("c" * 12, path, text))


def test_the_next_chunk_is_conditioned_on_the_previous_ones_tail(served, tmp_path, monkeypatch):
    engine, s, given = served
    encoded = []  # the audio and text the engine encoded as a prompt, in order
    real_encode = engine._encode_audio
    monkeypatch.setattr(engine, "_encode_audio", lambda audio, text: (
        encoded.append((audio.copy(), text)), real_encode(audio, text))[1])
    audio = run(s)
    carried = list(encoded)
    assert [text for text, _ in given] == SENTENCES
    assert given[0][1] is None and len(carried) == 2
    patch = engine._model.patch_size * engine._model.chunk_size
    for k in (0, 1):
        tail, text = carried[k]
        # Chunk k's last samples as it was sent, at most BOUND_S of its audio, and the words they hold.
        assert audio[k].size > 2 * BOUND_S * engine.sample_rate  # (else nothing was cut)
        assert 0 < tail.size <= BOUND_S * engine.sample_rate and np.array_equal(tail, audio[k][-tail.size:])
        assert SENTENCES[k].endswith(" " + text.rstrip()) and text.endswith(" ")
        # Chunk k+1's generation got that tail's VAE encoding: what the same audio gives as an uploaded voice.
        prompt = given[k + 1][1]
        assert prompt["prompt_text"] == text
        assert torch.equal(prompt["audio_feat"], as_voice(engine, tail, text, tmp_path / f"{k}.wav")["audio_feat"])
        # The tail's tokens, not the whole chunk's: the trimmed audio is what the prompt holds.
        assert prompt["audio_feat"].shape[0] == -(-tail.size // patch) < audio[k].size // patch


def test_a_request_voice_wins_over_the_carry(served, tmp_path):
    engine, s, given = served
    rate = engine.sample_rate
    t = np.arange(2 * rate) / rate
    path = tmp_path / "voice.wav"
    sf.write(path, (0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), rate, subtype="FLOAT")
    voice = VoicePrompt("v" * 12, path, "A reference clip.")
    run(s, prompt=voice)
    expected = engine._encode_prompt(voice)
    assert len(given) == 3
    for _, prompt in given:
        assert prompt["prompt_text"] == "A reference clip."
        assert torch.equal(prompt["audio_feat"], expected["audio_feat"])
