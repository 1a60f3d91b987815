"""Random-weight VoxCPM2 checkpoints (tiny, and the full-size structure), loaded and run by the voxcpm package's
own code: architecture "voxcpm2", AudioVAE V2 (16 kHz in, 48 kHz out), every tensor accounted for."""
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from service.engines.voxcpm.load import model_classes

from .support.voxcpm_checkpoint import (REF_AUDIO_END, REF_AUDIO_START, V2_ENCODE_HOP, V2_TOKEN_HOP, _config,
                                        build_checkpoint, build_tokenizer, load_report)

MAX_LEN = 8  # tokens: 8 * 7680 samples = 1.28 s at 48 kHz


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt2") / "tiny", size="tiny", seed=0, family="voxcpm2")


@pytest.fixture(scope="module")
def tts(ckpt):
    import voxcpm

    return voxcpm.VoxCPM(voxcpm_model_path=str(ckpt), zipenhancer_model_path=None, enable_denoiser=False,
                         optimize=False, device="cpu")


def test_layout_and_config_are_voxcpm2(ckpt):
    assert {p.name for p in ckpt.iterdir()} == {"config.json", "model.safetensors", "audiovae.pth", "tokenizer.json",
                                                "tokenizer_config.json", "special_tokens_map.json"}
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architecture"] == "voxcpm2" and cfg["residual_lm_no_rope"] is True
    assert cfg["patch_size"] == 4 and cfg["scalar_quantization_latent_dim"] == 512
    vae = cfg["audio_vae_config"]
    assert (vae["sample_rate"], vae["out_sample_rate"]) == (16000, 48000)
    # Both sides of the VAE run at the model's 6.25 Hz token rate.
    assert vae["sample_rate"] / (cfg["patch_size"] * np.prod(vae["encoder_rates"])) == 6.25
    assert vae["out_sample_rate"] / (cfg["patch_size"] * np.prod(vae["decoder_rates"])) == 6.25


def test_the_package_loads_it_as_voxcpm2_with_every_tensor(ckpt, tts):
    from voxcpm.model.voxcpm2 import VoxCPM2Model

    model = tts.tts_model
    assert isinstance(model, VoxCPM2Model)
    assert (model.sample_rate, model._encode_sample_rate) == (48000, 16000)
    assert model.patch_size * model._decode_chunk_size == V2_TOKEN_HOP
    assert model.patch_size * model.chunk_size == V2_ENCODE_HOP
    assert model.residual_lm.rope_emb is None and model.base_lm.rope_emb is not None
    assert model.base_lm.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.audio_vae.parameters())
    assert load_report(ckpt, tts) == {"missing": [], "mismatched": [], "unloaded": []}


def test_report_flags_a_v2_tensor_the_file_lacks(ckpt, tmp_path):
    """A VAE V2 tensor (the 48 kHz decoder's sample-rate conditioning) missing from the file is named."""
    from voxcpm.model.voxcpm2 import VoxCPM2Model

    partial = tmp_path / "partial"
    shutil.copytree(ckpt, partial)
    vae = torch.load(partial / "audiovae.pth", weights_only=True)
    dropped = next(k for k in vae if "sr_cond_model" in k and k.endswith("scale_embed.weight"))
    del vae[dropped]
    torch.save(vae, partial / "audiovae.pth")
    model = VoxCPM2Model.from_local(str(partial), optimize=False, device="cpu")  # loads without complaint
    assert load_report(partial, model) == {"missing": [], "mismatched": [], "unloaded": [f"audio_vae.{dropped}"]}


def test_tokenizer_has_the_reference_brackets(ckpt):
    from transformers import LlamaTokenizerFast

    tok = LlamaTokenizerFast.from_pretrained(str(ckpt))
    assert tok.convert_ids_to_tokens([REF_AUDIO_START, REF_AUDIO_END]) == ["<|ref_audio_start|>", "<|ref_audio_end|>"]


def _check_audio(wav, tokens=None):
    assert isinstance(wav, np.ndarray) and wav.dtype == np.float32 and wav.ndim == 1
    assert np.isfinite(wav).all() and wav.size > 0 and wav.size % V2_TOKEN_HOP == 0
    if tokens is not None:
        assert wav.size == tokens * V2_TOKEN_HOP


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 0.5 s 44.1 kHz clip: the package resamples it to the VAE's 16 kHz input itself."""
    path = tmp_path_factory.mktemp("clip") / "ref.wav"
    t = np.arange(22050) / 44100
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 44100)
    return str(path)


@pytest.mark.parametrize("mode", ["zero-shot", "reference", "continuation", "reference+continuation"])
def test_each_mode_generates_whole_tokens_of_48k_audio(tts, clip, mode):
    kwargs = {"zero-shot": {}, "reference": {"reference_wav_path": clip},
              "continuation": {"prompt_wav_path": clip, "prompt_text": "a prompt"},
              "reference+continuation": {"reference_wav_path": clip, "prompt_wav_path": clip,
                                         "prompt_text": "a prompt"}}[mode]
    torch.manual_seed(0)
    # min_len >= max_len - 1 disables the stop head, so random weights always give exactly max_len tokens.
    _check_audio(tts.generate(text="hello world", min_len=MAX_LEN, max_len=MAX_LEN, **kwargs), MAX_LEN)


def test_streaming_yields_one_token_of_48k_audio_per_step(tts):
    torch.manual_seed(0)
    chunks = list(tts.generate_streaming(text="hello world", min_len=MAX_LEN, max_len=MAX_LEN))
    assert len(chunks) == MAX_LEN
    for chunk in chunks:
        _check_audio(chunk, 1)


def test_full_size_structure_is_the_published_voxcpm2(tmp_path):
    """The full config instantiates (on the meta device: no memory) as the published 2B VoxCPM2 shapes."""
    from transformers import LlamaTokenizerFast

    config_cls, model_cls, vae_cls = model_classes("voxcpm2")
    vocab = build_tokenizer(tmp_path, 73448)
    cfg = config_cls.model_validate(_config("full", vocab, "bfloat16", "voxcpm2"))
    cfg.max_length = 16
    with torch.device("meta"):
        model = model_cls(cfg, LlamaTokenizerFast.from_pretrained(str(tmp_path)), vae_cls(cfg.audio_vae_config),
                          device="cpu")
    base, attn = model.base_lm, model.base_lm.layers[0].self_attn
    assert (len(base.layers), cfg.lm_config.hidden_size, attn.num_key_value_heads) == (28, 2048, 2)
    assert len(model.residual_lm.layers) == 8 and model.residual_lm.rope_emb is None
    assert len(model.feat_encoder.encoder.layers) == 12 and len(model.feat_decoder.estimator.decoder.layers) == 12
    assert model.fsq_layer.in_proj.out_features == 512
    assert (model.sample_rate, model._encode_sample_rate) == (48000, 16000)
    lm = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("audio_vae."))
    assert 1.9e9 < lm < 2.5e9, lm
