"""Correctness guard for continuous batching of VoxCPM2: each request generated inside a batch (joining
and leaving between steps, next to requests of other cloning modes) produces what the package's own
VoxCPM2 generate produces for it alone with the same seed.

Compared per request: the latent patch of every generated token (what the noise and every LM step
shape) and the whole decoded 48 kHz audio (the package's generate decodes the sequence at once, with a
continuation prompt's last patches ahead, cut off). Tolerance: identical token counts, max |difference|
< 1e-4, on a float32 tiny model on CPU (batched matrix products may round differently). Prompt caches
are the package's own (build_prompt_cache from wav files), one per mode: zero-shot, reference,
continuation, reference + continuation.
"""
import numpy as np
import pytest
import soundfile as sf
import torch

from service.engines.voxcpm.batch import BatchedGenerator, Join

from .support.voxcpm_checkpoint import build_checkpoint

TOL = 1e-4
STEPS = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random VoxCPM2 checkpoint (residual LM without RoPE, AudioVAE V2 16 -> 48 kHz with its
    sample-rate condition)."""
    return build_checkpoint(tmp_path_factory.mktemp("batch2") / "tiny", size="tiny", seed=5, dtype="float32",
                            family="voxcpm2")


@pytest.fixture(scope="module")
def model(ckpt):
    """The tiny checkpoint through the package's own loader."""
    from voxcpm.model.voxcpm2 import VoxCPM2Model

    return VoxCPM2Model.from_local(str(ckpt), optimize=False, device="cpu")


@pytest.fixture(scope="module")
def prompts(model, tmp_path_factory):
    """The package's prompt caches for each cloning mode, from two tones of different lengths."""
    d = tmp_path_factory.mktemp("clips")
    for name, hz, seconds in (("ref", 150, 2.0), ("cont", 220, 1.3)):
        tone(d / f"{name}.wav", hz, seconds)
    ref, cont = str(d / "ref.wav"), str(d / "cont.wav")
    caches = {"zero_shot": None,
              "reference": model.build_prompt_cache(reference_wav_path=ref),
              "continuation": model.build_prompt_cache(prompt_wav_path=cont, prompt_text="A short clip."),
              "ref_continuation": model.build_prompt_cache(reference_wav_path=ref, prompt_wav_path=cont,
                                                           prompt_text="A short clip.")}
    assert [c and c["mode"] for c in caches.values()] == [None, "reference", "continuation", "ref_continuation"]
    return caches


def tone(path, hz: float, seconds: float, rate: int = 16000):
    t = np.arange(int(rate * seconds)) / rate
    sf.write(str(path), 0.3 * np.sin(2 * np.pi * hz * t), rate)
    return path


def package(model, text, seed, max_len, prompt=None, steps=STEPS):
    """The package's own (non-streaming) VoxCPM2 generation: (latents [t, P, D], audio [samples])."""
    torch.manual_seed(seed)
    wav, _, feats = model.generate_with_prompt_cache(target_text=text, prompt_cache=prompt, max_len=max_len,
                                                     min_len=2, inference_timesteps=steps, cfg_value=2.0)
    return feats.float().numpy(), wav[0].numpy()


def batched(gen, schedule):
    """schedule: {step: [(key, Join)]} joining (prefilled together) before that step; -> {key: (latents, audio)}."""
    got, key_of, step = {}, {}, 0
    while True:
        joins = schedule.get(step, [])
        for key, handle in zip([k for k, _ in joins], gen.add_many([j for _, j in joins])):
            key_of[handle], got[key] = key, []
        if not gen.active() and step > max(schedule):
            return {k: (np.stack([p for p, _ in v]), np.concatenate([a for _, a in v])) for k, v in got.items()}
        for row, audio, _ in gen.step():
            got[key_of[row]].append((gen.last_patch[row].float().numpy(), audio))
        step += 1


def assert_same(got, want):
    (g_lat, g_audio), (w_lat, w_audio) = got, want
    assert g_lat.shape == w_lat.shape and g_audio.shape == w_audio.shape
    assert np.abs(g_lat - w_lat).max() < TOL
    assert np.abs(g_audio - w_audio).max() < TOL
    assert np.abs(w_audio).max() > 1e-3  # the audio is not silence


def test_every_cloning_mode_batched_equals_the_package_alone(model, prompts):
    """Four requests, one per mode, of different lengths and step counts: two start together, one joins
    mid-generation (a bucket of 4 with a padding row), the last waits for a row another one leaves."""
    cases = {  # key: (text, seed, max_len, timesteps, prompt mode)
        "zero_shot": ("Hello world, this is the first request.", 11, 9, STEPS, "zero_shot"),
        "reference": ("A much longer request in the voice of the reference clip.", 22, 14, 3, "reference"),
        "continuation": ("Short.", 33, 5, STEPS, "continuation"),
        "ref_continuation": ("Both prompts at once.", 44, 7, 5, "ref_continuation"),
    }
    want = {k: package(model, t, s, n, prompts[mode], steps) for k, (t, s, n, steps, mode) in cases.items()}
    assert len({w[0].shape[0] for w in want.values()}) > 2  # the rows really finish at different steps

    def join(key):
        text, seed, n, steps, mode = cases[key]
        return key, Join(text, prompts[mode], max_len=n, min_len=2, inference_timesteps=steps, cfg_value=2.0,
                         seed=seed)

    gen = BatchedGenerator(model, record_latents=True, max_batch=3, max_length=256)
    assert gen.family.v2 and gen.audio.shape[1] == model.patch_size * 1920  # 48 kHz samples per token
    left = 2 + want["continuation"][0].shape[0]  # the step after "continuation" has left its row
    assert left < want["reference"][0].shape[0]  # ... while the others still run
    got = batched(gen, {0: [join("reference"), join("zero_shot")], 2: [join("continuation")],
                        left: [join("ref_continuation")]})
    for key in cases:
        assert_same(got[key], want[key])
    assert gen.active() == 0 and gen.free_slots() == 3
    # The comparison is sensitive: another seed gives latents far outside the tolerance.
    other = package(model, cases["zero_shot"][0], 12, cases["zero_shot"][2])
    assert np.abs(other[0] - want["zero_shot"][0]).max() > 100 * TOL


def test_the_step_has_no_host_sync_and_no_data_dependent_python(model, prompts):
    """VoxCPM2's step parts (fused residual input, concatenated DiT condition, V2 decoder) each trace
    as one graph, as VoxCPM-1.5's do (tests/test_voxcpm_batching.py)."""
    gen = BatchedGenerator(model, max_batch=4, max_length=512)
    gen.add_many([Join("One.", prompts["ref_continuation"], max_len=8, inference_timesteps=STEPS, seed=1),
                  Join("Two.", None, max_len=8, inference_timesteps=STEPS, seed=2)])
    b, length, iters = gen.shapes()
    assert (b, length, iters) == (2, 256, STEPS)
    torch._dynamo.reset()
    with torch.inference_mode():
        for fn, args in ((gen.dit_step, (b, iters)), (gen.lm_step, (b, length)), (gen.vae_step, (b,))):
            torch.compile(fn, fullgraph=True, backend="eager")(*args)


@pytest.mark.parametrize("cond_type", ["scale_bias", "add", "concat"])
def test_streaming_v2_decode_equals_decoding_the_whole_sequence(cond_type):
    """AudioVAE V2 (48 kHz out, sample-rate condition ahead of each upsampling block) decoded one patch
    per step with carried state gives the samples of one decode of the whole latent sequence."""
    from voxcpm.modules.audiovae import AudioVAEV2
    from voxcpm.modules.audiovae.audio_vae_v2 import AudioVAEConfig

    from service.engines.voxcpm.vae_stream import StreamingDecoder

    torch.manual_seed(1)
    vae = AudioVAEV2(AudioVAEConfig(encoder_dim=16, decoder_dim=64, decoder_rates=[8, 6, 5, 2, 2, 2],
                                    cond_type=cond_type, cond_dim=8, cond_out_layer=cond_type == "concat")).eval()
    with torch.no_grad():  # non-trivial conditions (the package initialises scale 1, bias 0)
        for name, p in vae.named_parameters():
            if "embed" in name:
                p.normal_(1.0, 0.3)
    latents = torch.randn(2, 64, 6 * 4)  # [b, D, t * P]
    with torch.inference_mode():
        # Row by row: the package's concat condition decodes one row at a time.
        whole = torch.cat([vae.decode(latents[i:i + 1]) for i in range(2)])
        dec = StreamingDecoder(vae, max_rows=2, device="cpu")
        streamed = torch.cat([dec.decode(latents[..., t:t + 4]) for t in range(0, 24, 4)], dim=-1)
    assert streamed.shape == whole.shape == (2, 1, 24 * 1920)
    assert (streamed - whole).abs().max() < 1e-5
    assert whole.abs().max() > 1e-4


def test_the_engine_batches_every_clone_mode_as_it_serves_them_one_at_a_time(ckpt, tmp_path):
    """The VoxCPM2 engine's batch (make_batch / batch_add, the scheduler's calls) gives each request the
    audio its serial path (the package's generate) gives: voice design by instructions, and an uploaded
    voice in each clone mode, the engine building the prompt caches and the control prefix."""
    from service.engines.base import BatchingEngine, CloneMode, SynthesisParams, VoicePrompt
    from service.engines.voxcpm.voxcpm2 import VoxCPM2Engine

    engine = VoxCPM2Engine(model_dir=ckpt, device="cpu", compile_mode="off", inference_timesteps=3, max_len=8,
                           retry_badcase=False)
    engine.load()
    assert isinstance(engine, BatchingEngine) and engine.supports_batching
    transcript = "A short clip."
    voice = VoicePrompt("v", tone(tmp_path / "voice.wav", 180, 1.5, rate=22050), transcript,
                        engine.voice_modes(transcript))
    requests = [("Designed voice.", None, SynthesisParams(seed=1, instructions="a calm older woman"))] + [
        (f"In mode {mode.value}.", voice, SynthesisParams(seed=2 + i, clone_mode=mode.value,
                                                          instructions=None if mode == CloneMode.CONTINUATION
                                                          else "slowly"))
        for i, mode in enumerate((CloneMode.REFERENCE, CloneMode.CONTINUATION, CloneMode.REFERENCE_CONTINUATION))]

    def serial(text, prompt, params):
        """What engine.synthesize runs (the package's generate on the engine's arguments), with latents."""
        args = engine._generation_args(text, prompt, params)
        engine._seed_package(params)  # as synthesize does
        wav, _, feats = engine._model.generate_with_prompt_cache(**args)
        return feats.float().numpy(), wav[0].numpy()

    want = [serial(*r) for r in requests]
    batch = engine.make_batch(4)
    batch.record_latents = True  # random VAE weights barely depend on the latents: compare those too
    rows = engine.batch_add(batch, requests)
    got = {row: [] for row in rows}
    while batch.active():
        for row, audio, _ in batch.step():
            got[row].append((batch.last_patch[row].float().numpy(), audio))
    for row, w in zip(rows, want):
        assert_same((np.stack([p for p, _ in got[row]]), np.concatenate([a for _, a in got[row]])), w)
    assert np.abs(want[1][0][:2] - want[3][0][:2]).max() > 100 * TOL  # the modes really condition differently


def test_a_worker_serving_voxcpm2_batches_its_requests(ckpt, tmp_path):
    """TTS_ENGINE=voxcpm2 with TTS_MAX_BATCH=3: the scheduler runs the batched step (warmed up before
    ready) and serves concurrent requests from it, 48 kHz in whole tokens."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from .support.worker import start_worker

    env = {"TTS_ENGINE": "voxcpm2", "MODEL_DIR": str(ckpt), "TTS_DEVICE": "auto", "TTS_MAX_BATCH": "3",
           "QUEUE_SIZE": "6", "VOXCPM_MAX_LEN": "16", "VOXCPM_INFERENCE_TIMESTEPS": "2", "CROSSFADE_MS": "0"}
    with start_worker(tmp_path, env) as w:
        assert "continuous batching: up to 3 requests" in w.log_text()
        assert "batch_warmup_s" in requests.get(f"{w.url}/readyz").json()["startup"]

        def one(i):
            r = requests.post(f"{w.url}/v1/audio/speech", json={
                "input": f"Request number {i}.", "response_format": "pcm", "seed": i, "stream": i % 2 == 0,
                "instructions": "a calm voice" if i == 1 else None})
            return r.status_code, len(r.content) // 2

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(4)))
    assert all(code == 200 and n > 0 and n % (4 * 1920) == 0 for code, n in results), results
