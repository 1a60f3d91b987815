"""The tiny random-weight VoxCPM-1.5 checkpoint, loaded and run by the voxcpm package's own code."""
import json
import shutil

import numpy as np
import pytest
import torch

from .support.voxcpm_checkpoint import AUDIO_END, AUDIO_START, BOS, EOS, TOKEN_HOP, build_checkpoint, load_report

MAX_LEN = 8  # tokens: 8 * 7056 samples = 1.28 s at 44.1 kHz


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="module")
def tts(ckpt):
    import voxcpm

    return voxcpm.VoxCPM(voxcpm_model_path=str(ckpt), zipenhancer_model_path=None, enable_denoiser=False,
                         optimize=False, device="cpu")


def test_layout_and_config_are_voxcpm_1_5(ckpt):
    assert {p.name for p in ckpt.iterdir()} == {"config.json", "model.safetensors", "audiovae.pth", "tokenizer.json",
                                                "tokenizer_config.json", "special_tokens_map.json"}
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architecture"] == "voxcpm" and cfg["dtype"] == "bfloat16"
    assert cfg["patch_size"] == 4 and cfg["feat_dim"] == 64
    vae = cfg["audio_vae_config"]
    assert vae["encoder_rates"] == [2, 3, 6, 7, 7] and vae["decoder_rates"] == [7, 7, 6, 3, 2]
    assert vae["sample_rate"] == 44100 and vae["sample_rate"] / (cfg["patch_size"] * np.prod(vae["encoder_rates"])) == 6.25


def test_every_saved_tensor_was_loaded(ckpt, tts):
    model = tts.tts_model
    assert model.sample_rate == 44100 and model.patch_size * model.chunk_size == TOKEN_HOP
    # CPU keeps the config's bfloat16 for the LM side; the VAE is always float32.
    assert model.base_lm.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.audio_vae.parameters())
    assert load_report(ckpt, tts) == {"missing": [], "mismatched": [], "unloaded": []}


def test_report_flags_a_model_that_was_not_loaded(ckpt):
    """The check above can fail: a model built from the same config but never loaded is flagged everywhere."""
    from transformers import LlamaTokenizerFast
    from voxcpm.model.voxcpm import VoxCPMConfig, VoxCPMModel
    from voxcpm.modules.audiovae import AudioVAE

    cfg = VoxCPMConfig.model_validate_json((ckpt / "config.json").read_text())
    cfg.max_length = 16
    torch.manual_seed(0)  # the same seed the builder instantiated with: only the redraw tells them apart
    fresh = VoxCPMModel(cfg, LlamaTokenizerFast.from_pretrained(str(ckpt)), AudioVAE(cfg.audio_vae_config),
                        device="cpu").to(torch.bfloat16)
    fresh.audio_vae.to(torch.float32)
    report = load_report(ckpt, fresh)
    floating = [k for k, v in fresh.state_dict().items() if v.is_floating_point()]
    assert report["missing"] == [] and report["unloaded"] == []
    assert set(report["mismatched"]) == set(floating)


def test_report_flags_a_tensor_the_file_lacks(ckpt, tmp_path):
    """strict=False silently keeps init values for absent keys; the report names them."""
    from safetensors.torch import load_file, save_file
    from voxcpm.model.voxcpm import VoxCPMModel

    partial = tmp_path / "partial"
    shutil.copytree(ckpt, partial)
    tensors = load_file(str(partial / "model.safetensors"))
    dropped = "stop_head.weight"
    del tensors[dropped]
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    model = VoxCPMModel.from_local(str(partial), optimize=False, device="cpu")  # loads without complaint
    assert load_report(partial, model) == {"missing": [], "mismatched": [], "unloaded": [dropped]}


def _check_audio(wav):
    assert isinstance(wav, np.ndarray) and wav.dtype == np.float32 and wav.ndim == 1
    assert np.isfinite(wav).all()
    assert wav.size > 0 and wav.size % TOKEN_HOP == 0


def test_generate_returns_whole_tokens_of_44k1_audio(tts):
    torch.manual_seed(0)
    # min_len >= max_len - 1 disables the stop head, so random weights always give exactly max_len tokens.
    wav = tts.generate(text="hello world", min_len=MAX_LEN, max_len=MAX_LEN)
    _check_audio(wav)
    assert wav.size == MAX_LEN * TOKEN_HOP
    assert tts.tts_model.sample_rate == 44100


def test_generate_streaming_yields_one_token_of_audio_per_step(tts):
    torch.manual_seed(0)
    chunks = list(tts.generate_streaming(text="hello world", min_len=MAX_LEN, max_len=MAX_LEN))
    assert len(chunks) == MAX_LEN
    for chunk in chunks:
        _check_audio(chunk)
        assert chunk.size == TOKEN_HOP
    # A free-running generation stops at min_len + 2 tokens at the earliest, max_len at the latest.
    free = tts.generate(text="hello world", min_len=2, max_len=MAX_LEN)
    _check_audio(free)
    assert 4 * TOKEN_HOP <= free.size <= MAX_LEN * TOKEN_HOP


@pytest.mark.parametrize("text", ["Hello, world! 123 (A-Z) @#$%", "你好，世界。今天天气很好！", "mixed 中文 and English: 3.14"])
def test_tokenizer_round_trips_english_and_chinese(ckpt, tts, text):
    from transformers import LlamaTokenizerFast

    vocab_size = tts.tts_model.config.lm_config.vocab_size
    ids = tts.tts_model.text_tokenizer(text)  # the package's wrapper: what generation feeds the LM
    assert ids and all(0 < i < vocab_size for i in ids)  # 0 is <unk>: nothing unknown, unmapped characters use bytes
    tok = LlamaTokenizerFast.from_pretrained(str(ckpt))
    assert len(tok) == vocab_size
    assert tok.decode(ids) == text
    assert tok(text)["input_ids"] == [BOS] + ids


def test_tokenizer_has_the_ids_the_model_uses(ckpt):
    from transformers import LlamaTokenizerFast

    tok = LlamaTokenizerFast.from_pretrained(str(ckpt))
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (BOS, EOS, 0)
    assert tok.convert_ids_to_tokens([AUDIO_START, AUDIO_END]) == ["<|audio_start|>", "<|audio_end|>"]
    # Outside the vocabulary: the word mark, then the 4 UTF-8 bytes as byte tokens (no <unk>).
    assert tok.tokenize("😀") == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert 0 not in tok.convert_tokens_to_ids(tok.tokenize("😀")) and tok.decode(tok("😀")["input_ids"][1:]) == "😀"
