"""Build random-weight VoxCPM-1.5 checkpoints in the package's exact on-disk layout.

No real weights are reachable here, so tests (tiny) and benchmarks (full size) make their own:
config.json, model.safetensors (everything but the VAE), audiovae.pth (the VAE's state dict) and a
LlamaTokenizerFast built offline with `tokenizers`. Weights come from the package's own modules,
so every key name is what `VoxCPMModel.from_local` expects; each tensor is then re-drawn from
`seed`, so a test can tell a loaded tensor from a freshly initialised one.

CLI: python -m tests.support.voxcpm_checkpoint OUT_DIR [--size tiny|full] [--seed N] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json
import string
import time
from pathlib import Path

import torch

# Reserved ids the model uses as raw integers (VoxCPMModel.audio_start_token / audio_end_token).
AUDIO_START, AUDIO_END = 101, 102
_COMMON_HANZI = ("你好世界今天气很我们的是在有一个不了人这中大为上来到说国和地也子时道出而要于就下得可以"
                 "声音语合成测试欢迎使用文本转")


def _config(size: str, vocab_size: int, dtype: str) -> dict:
    if size == "tiny":
        lm = dict(hidden=64, ffn=128, heads=4, kv_heads=2, layers=2, max_pos=4096)
        residual_layers, local = 1, dict(hidden_dim=64, ffn_dim=128, num_heads=4, num_layers=1)
        vae = dict(encoder_dim=16, decoder_dim=32)
        max_length = 4096
    elif size == "full":  # the published VoxCPM-1.5 shapes
        lm = dict(hidden=1024, ffn=4096, heads=16, kv_heads=2, layers=24, max_pos=32768)
        residual_layers, local = 8, dict(hidden_dim=1024, ffn_dim=4096, num_heads=16, num_layers=8)
        vae = dict(encoder_dim=64, decoder_dim=2048)
        max_length = 8192
        vocab_size = 73448
    else:
        raise ValueError(f"size must be tiny or full, not {size!r}")
    half_head = lm["hidden"] // lm["heads"] // 2
    return {
        "architecture": "voxcpm",
        "lm_config": {
            "bos_token_id": 1, "eos_token_id": 2, "hidden_size": lm["hidden"], "intermediate_size": lm["ffn"],
            "max_position_embeddings": lm["max_pos"], "num_attention_heads": lm["heads"],
            "num_hidden_layers": lm["layers"], "num_key_value_heads": lm["kv_heads"], "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": {"type": "longrope", "long_factor": [1.0] * half_head,
                             "short_factor": [1.0] * half_head, "original_max_position_embeddings": lm["max_pos"]},
            "vocab_size": vocab_size, "use_mup": False, "scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4,
        },
        "patch_size": 4,
        "feat_dim": 64,
        "residual_lm_num_layers": residual_layers,
        "scalar_quantization_latent_dim": 256,
        "scalar_quantization_scale": 9,
        "encoder_config": dict(local),
        "dit_config": {**local, "cfm_config": {"sigma_min": 1e-6, "solver": "euler", "t_scheduler": "log-norm",
                                               "inference_cfg_rate": 2.0}},
        "audio_vae_config": {"encoder_dim": vae["encoder_dim"], "encoder_rates": [2, 3, 6, 7, 7], "latent_dim": 64,
                             "decoder_dim": vae["decoder_dim"], "decoder_rates": [7, 7, 6, 3, 2], "depthwise": True,
                             "sample_rate": 44100, "use_noise_block": False},
        "max_length": max_length,
        "device": "cuda",
        "dtype": dtype,
    }


def build_tokenizer(out_dir: Path, vocab_size: int | None = None) -> int:
    """A Llama-layout tokenizer (byte-fallback BPE with ▁ word marks); returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, 256):
        vocab[{AUDIO_START: "<|audio_start|>", AUDIO_END: "<|audio_end|>"}.get(i, f"<|reserved_{i}|>")] = i
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁" + string.ascii_letters + string.digits + string.punctuation + "，。！？、；：“”（）" + _COMMON_HANZI:
        vocab.setdefault(ch, len(vocab))
    if vocab_size is not None:  # pad to the real size so embedding shapes match the real model
        for i in range(len(vocab), vocab_size):
            vocab[f"<|pad_{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<|audio_start|>", "<|audio_end|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 32768}))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return len(vocab)


def _redraw(state: dict, seed: int) -> dict:
    """Deterministic random values for every tensor: norms near 1, everything else small normal."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith(".alpha"):
            out[name] = 1.0 + 0.05 * noise
        elif name.endswith("bias"):
            out[name] = 0.01 * noise
        else:
            out[name] = 0.02 * noise
    return out


def build_checkpoint(out_dir, size: str = "tiny", seed: int = 0, dtype: str = "bfloat16") -> Path:
    from safetensors.torch import save_file
    from transformers import LlamaTokenizerFast
    from voxcpm.model.voxcpm import VoxCPMConfig, VoxCPMModel
    from voxcpm.modules.audiovae import AudioVAE, AudioVAEConfig

    out_dir = Path(out_dir)
    vocab_size = build_tokenizer(out_dir, 73448 if size == "full" else None)
    config = _config(size, vocab_size, dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))

    torch.manual_seed(seed)
    cfg = VoxCPMConfig.model_validate(config)
    vae = AudioVAE(config=AudioVAEConfig.model_validate(config["audio_vae_config"]))
    vae_state = _redraw(vae.state_dict(), seed + 1)
    torch.save(vae_state, out_dir / "audiovae.pth")
    del vae
    # The package's own module tree gives the exact key names; a small cache keeps this cheap.
    cfg.max_length = 16
    model = VoxCPMModel(cfg, LlamaTokenizerFast.from_pretrained(str(out_dir)), AudioVAE(cfg.audio_vae_config),
                        device="cpu")
    lm_state = {k: v for k, v in model.state_dict().items() if not k.startswith("audio_vae.")}
    del model
    save_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    tensors = {k: v.to(save_dtype).contiguous() for k, v in _redraw(lm_state, seed).items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def load_report(ckpt_dir, model) -> dict:
    """Compare every saved tensor with the loaded model (the package loads with strict=False).

    Returns {"missing": keys saved but absent from the model, "mismatched": keys whose loaded value
    differs from the file, "unloaded": model parameters that no saved tensor provided}.
    """
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    saved = dict(load_file(str(ckpt_dir / "model.safetensors")))
    for k, v in torch.load(ckpt_dir / "audiovae.pth", map_location="cpu", weights_only=True).items():
        saved[f"audio_vae.{k}"] = v
    live = model.state_dict()
    missing = sorted(k for k in saved if k not in live)
    mismatched = sorted(k for k, v in saved.items() if k in live and not torch.equal(
        live[k].detach().cpu().to(torch.float32), v.to(live[k].dtype).to(torch.float32)))
    unloaded = sorted(k for k, _ in model.named_parameters() if k not in saved and "lora" not in k)
    return {"missing": missing, "mismatched": mismatched, "unloaded": unloaded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    args = ap.parse_args()
    t0 = time.monotonic()
    out = build_checkpoint(args.out_dir, args.size, args.seed, args.dtype)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        params = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                     else _numel(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"built {args.size} checkpoint in {out} ({params / 1e6:.1f}M non-VAE parameters, "
          f"{time.monotonic() - t0:.1f}s)")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
