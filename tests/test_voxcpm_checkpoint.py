"""The tiny VoxCPM-1.5 checkpoint the tests build, loaded by the package's own code."""
import json

import numpy as np
import pytest
import torch

from .support.voxcpm_checkpoint import build_checkpoint, load_report

TOKEN_SAMPLES = 4 * 1764


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="module")
def model(ckpt):
    from voxcpm.model.voxcpm import VoxCPMModel

    return VoxCPMModel.from_local(str(ckpt), optimize=False, device="cpu")


def test_layout_is_the_packages(ckpt):
    assert {p.name for p in ckpt.iterdir()} == {"config.json", "model.safetensors", "audiovae.pth", "tokenizer.json",
                                                "tokenizer_config.json", "special_tokens_map.json"}
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["patch_size"] == 4 and cfg["audio_vae_config"]["encoder_rates"] == [2, 3, 6, 7, 7]
    assert cfg["audio_vae_config"]["sample_rate"] == 44100


def test_every_saved_tensor_was_loaded(ckpt, model):
    report = load_report(ckpt, model)
    assert report == {"missing": [], "mismatched": [], "unloaded": []}


def test_load_report_catches_tensors_that_were_not_loaded(ckpt):
    """The check above can fail: a model built with fresh random weights is flagged."""
    from transformers import LlamaTokenizerFast
    from voxcpm.model.voxcpm import VoxCPMConfig, VoxCPMModel
    from voxcpm.modules.audiovae import AudioVAE

    cfg = VoxCPMConfig.model_validate_json((ckpt / "config.json").read_text())
    cfg.max_length = 16
    fresh = VoxCPMModel(cfg, LlamaTokenizerFast.from_pretrained(str(ckpt)), AudioVAE(cfg.audio_vae_config),
                        device="cpu")
    report = load_report(ckpt, fresh)
    assert len(report["mismatched"]) > 0.9 * len(fresh.state_dict())


def test_generates_44k1_audio_in_whole_tokens(model):
    assert model.sample_rate == 44100 and model.patch_size * model.chunk_size == TOKEN_SAMPLES
    torch.manual_seed(0)
    wav, _, _ = model.generate_with_prompt_cache(target_text="hello world", prompt_cache=None, max_len=8)
    audio = wav.squeeze(0).numpy()
    assert audio.dtype == np.float32 and np.isfinite(audio).all() and audio.size % TOKEN_SAMPLES == 0
    chunks = [w.squeeze(0).numpy() for w, _, _ in
              model.generate_with_prompt_cache_streaming(target_text="hello world", prompt_cache=None, max_len=8)]
    assert chunks and all(c.size == TOKEN_SAMPLES for c in chunks)


@pytest.mark.parametrize("text", ["Hello, world! 123", "你好，世界。", "mixed 中文 and English"])
def test_tokenizer_covers_english_and_chinese(model, text):
    ids = model.text_tokenizer(text)
    assert ids and all(0 <= i < model.config.lm_config.vocab_size for i in ids)
    assert 0 not in ids  # nothing became <unk>: unknown characters fall back to bytes
