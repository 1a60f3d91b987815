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

from .support.voxcpm_checkpoint import _config, _redraw, build_tokenizer

TOL = 1e-4
STEPS = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random VoxCPM2 (residual LM without RoPE, AudioVAE V2 16 -> 48 kHz with its sample-rate
    condition), built in memory from the package's own classes."""
    from transformers import LlamaTokenizerFast
    from voxcpm.model.voxcpm2 import VoxCPM2Model, VoxCPMConfig
    from voxcpm.modules.audiovae import AudioVAEV2

    tok_dir = tmp_path_factory.mktemp("v2tok")
    config = _config("tiny", build_tokenizer(tok_dir), "float32")
    config.update(architecture="voxcpm2", residual_lm_no_rope=True, scalar_quantization_latent_dim=512,
                  max_length=512, device="cpu")
    config["dit_config"]["dit_mean_mode"] = config.pop("dit_mean_mode")
    config["audio_vae_config"] = {
        "encoder_dim": 16, "encoder_rates": [2, 5, 8, 8], "latent_dim": 64, "decoder_dim": 128,
        "decoder_rates": [8, 6, 5, 2, 2, 2], "depthwise": True, "sample_rate": 16000, "out_sample_rate": 48000,
        "sr_bin_boundaries": [20000, 30000, 40000], "cond_type": "scale_bias"}
    cfg = VoxCPMConfig.model_validate(config)
    torch.manual_seed(0)
    m = VoxCPM2Model(cfg, LlamaTokenizerFast.from_pretrained(str(tok_dir)), AudioVAEV2(cfg.audio_vae_config),
                     device="cpu")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, t in m.state_dict().items():
            t.copy_(_redraw(name, t, gen))
    return m.eval()


@pytest.fixture(scope="module")
def prompts(model, tmp_path_factory):
    """The package's prompt caches for each cloning mode, from two tones of different lengths."""
    d = tmp_path_factory.mktemp("clips")
    for name, hz, seconds in (("ref", 150, 2.0), ("cont", 220, 1.3)):
        t = np.arange(int(16000 * seconds)) / 16000
        sf.write(str(d / f"{name}.wav"), 0.3 * np.sin(2 * np.pi * hz * t), 16000)
    ref, cont = str(d / "ref.wav"), str(d / "cont.wav")
    caches = {"zero_shot": None,
              "reference": model.build_prompt_cache(reference_wav_path=ref),
              "continuation": model.build_prompt_cache(prompt_wav_path=cont, prompt_text="A short clip."),
              "ref_continuation": model.build_prompt_cache(reference_wav_path=ref, prompt_wav_path=cont,
                                                           prompt_text="A short clip.")}
    assert [c and c["mode"] for c in caches.values()] == [None, "reference", "continuation", "ref_continuation"]
    return caches


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
