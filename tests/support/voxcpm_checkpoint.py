"""Build random-weight VoxCPM-1.5 and VoxCPM2 checkpoints in the package's exact on-disk layout.

No real weights are reachable here, so tests (tiny) and benchmarks (full size) make their own:

    config.json              architecture "voxcpm": VoxCPM-1.5 (patch 4, 44.1 kHz VAE, 6.25 Hz tokens), or
                             architecture "voxcpm2": VoxCPM2 (patch 4, AudioVAE V2 encoding 16 kHz and decoding
                             48 kHz, residual LM without RoPE, FSQ 512, 6.25 Hz tokens)
    model.safetensors        every non-VAE tensor, in `dtype` (bfloat16 unless asked otherwise)
    audiovae.pth             the AudioVAE state dict (float32), saved with torch.save
    tokenizer.json           a LlamaTokenizerFast built offline with `tokenizers`
    tokenizer_config.json    (char-level BPE without merges + byte fallback: any text tokenizes, no <unk>)
    special_tokens_map.json

Key names come from instantiating the package's own model class (VoxCPMModel / VoxCPM2Model) and AudioVAE
(V1 / V2) with the config, so they are
exactly what `VoxCPMModel.from_local` expects. Every tensor is then re-drawn deterministically from `seed`
(so it differs from a fresh init), which lets `load_report` tell a loaded tensor from one left at init;
`from_local` loads with strict=False, so nothing else would notice.

CLI: python -m tests.support.voxcpm_checkpoint OUT_DIR [--family voxcpm|voxcpm2] [--size tiny|full] [--seed N]
     [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import string
import time
from pathlib import Path

import torch

from service.engines.registry import FAMILIES as SERVED

# Ids the model uses as raw integers (VoxCPMModel.audio_start_token / audio_end_token), and the
# LM config's bos/eos. Id 0 is <unk>; ids 3..255 are reserved specials like the real MiniCPM vocabulary.
# VoxCPM2 adds the reference-audio brackets (VoxCPM2Model.ref_audio_start_token / ref_audio_end_token).
UNK, BOS, EOS, AUDIO_START, AUDIO_END = 0, 1, 2, 101, 102
REF_AUDIO_START, REF_AUDIO_END = 103, 104
FULL_VOCAB = 73448
TOKEN_HOP = 4 * 1764  # patch_size * prod(encoder_rates): 44.1 kHz samples per 6.25 Hz token
V2_TOKEN_HOP = 4 * 1920  # VoxCPM2: patch_size * prod(decoder_rates): 48 kHz output samples per 6.25 Hz token
V2_ENCODE_HOP = 4 * 640  # VoxCPM2: patch_size * prod(encoder_rates): 16 kHz reference samples per token
# The checkpoint architectures the worker serves (config.json's "architecture").
FAMILIES = tuple(a for family in SERVED.values() for a in family.architectures)

# MiniCPM4 LongRoPE factors (head_dim 64 -> 32 values), as in the published VoxCPM-1.5 config.json.
_LONGROPE = [
    1.0004360675811768, 1.0668443441390991, 1.1631425619125366, 1.3025742769241333, 1.5040205717086792,
    1.7941505908966064, 2.2101221084594727, 2.802666664123535, 3.6389970779418945, 4.804192543029785,
    6.39855432510376, 8.527148246765137, 11.277542114257812, 14.684998512268066, 18.69317054748535,
    23.13019371032715, 27.72362518310547, 32.1606559753418, 36.168827056884766, 39.57627868652344,
    42.32667541503906, 44.45526885986328, 46.04962921142578, 47.21482849121094, 48.05115509033203,
    48.64370346069336, 49.05967712402344, 49.34980392456055, 49.551246643066406, 49.69068145751953,
    49.78697967529297, 49.85338592529297,
]
_COMMON_HANZI = (
    "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么"
    "心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现"
    "分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位"
    "因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师"
    "书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及"
    "今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结"
    "六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区"
    "音语合测试欢迎使文转换谢您吗呢吧啊哦嗯，。！？、；：“”‘’（）《》…—"
)


def _shapes(family: str, size: str) -> dict:
    """Layer shapes per family and size. Full VoxCPM-1.5 is the published openbmb/VoxCPM1.5 structure; full
    VoxCPM2 follows the published figures (base LM 28 layers, hidden 2048, 2 KV heads; residual LM 8 layers
    without RoPE; LocEnc/LocDiT 12 layers; FSQ 512; AudioVAE V2 16 kHz in, 48 kHz out). VoxCPM2's base LM has
    32 heads so its head size (64) equals the local modules' (1024 / 16): every MiniCPM stack in the model
    shares the LM config's LongRoPE factors, one per rotary pair. Its FFN (6144) lands the total near 2B."""
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be tiny or full, not {size!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    if size == "tiny":
        shapes = dict(lm=dict(hidden=64, ffn=128, heads=4, kv_heads=2, layers=2, max_pos=4096), residual_layers=1,
                      local=dict(hidden_dim=64, ffn_dim=128, num_heads=4, num_layers=1), max_length=4096)
    elif family == "voxcpm":
        shapes = dict(lm=dict(hidden=1024, ffn=4096, heads=16, kv_heads=2, layers=24, max_pos=32768),
                      residual_layers=8, local=dict(hidden_dim=1024, ffn_dim=4096, num_heads=16, num_layers=8),
                      max_length=8192)
    else:
        shapes = dict(lm=dict(hidden=2048, ffn=6144, heads=32, kv_heads=2, layers=28, max_pos=32768),
                      residual_layers=8, local=dict(hidden_dim=1024, ffn_dim=4096, num_heads=16, num_layers=12),
                      max_length=8192)
    full = size == "full"
    if family == "voxcpm":
        shapes["vae"] = {"encoder_dim": 64 if full else 16, "encoder_rates": [2, 3, 6, 7, 7], "latent_dim": 64,
                         "decoder_dim": 2048 if full else 32, "decoder_rates": [7, 7, 6, 3, 2], "depthwise": True,
                         "sample_rate": 44100, "use_noise_block": False}
        shapes["fsq_latent"] = 256
    else:
        # The decoder halves its channels at each of its 6 upsampling stages: tiny needs 64 to end on 1.
        shapes["vae"] = {"encoder_dim": 128 if full else 16, "encoder_rates": [2, 5, 8, 8], "latent_dim": 64,
                         "decoder_dim": 2048 if full else 64, "decoder_rates": [8, 6, 5, 2, 2, 2], "depthwise": True,
                         "sample_rate": 16000, "out_sample_rate": 48000, "use_noise_block": False,
                         "sr_bin_boundaries": [20000, 30000, 40000], "cond_type": "scale_bias", "cond_dim": 128,
                         "cond_out_layer": False}
        shapes["fsq_latent"] = 512
    return shapes


def _rope_factors(half_head: int) -> list[float]:
    if half_head > len(_LONGROPE):  # every shape here has a head of at most 64 (the published one)
        raise ValueError(f"no LongRoPE factors for a head of {2 * half_head}; the published ones cover 64")
    return _LONGROPE[:half_head]


def _config(size: str, vocab_size: int, dtype: str, family: str = "voxcpm") -> dict:
    shapes = _shapes(family, size)
    lm, local = shapes["lm"], shapes["local"]
    factors = _rope_factors(lm["hidden"] // lm["heads"] // 2)
    # kv_channels is left out (not null): the package's pydantic models reject an explicit null.
    config = {
        "architecture": family,
        "lm_config": {
            "bos_token_id": BOS,
            "eos_token_id": EOS,
            "vocab_size": FULL_VOCAB if size == "full" else vocab_size,
            "hidden_size": lm["hidden"],
            "intermediate_size": lm["ffn"],
            "max_position_embeddings": lm["max_pos"],
            "num_attention_heads": lm["heads"],
            "num_hidden_layers": lm["layers"],
            "num_key_value_heads": lm["kv_heads"],
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000,
            "rope_scaling": {"type": "longrope", "long_factor": list(factors), "short_factor": list(factors),
                             "original_max_position_embeddings": lm["max_pos"]},
            "scale_emb": 12,
            "dim_model_base": 256,
            "scale_depth": 1.4,
            "use_mup": False,
        },
        "patch_size": 4,
        "feat_dim": 64,
        "scalar_quantization_latent_dim": shapes["fsq_latent"],
        "scalar_quantization_scale": 9,
        "residual_lm_num_layers": shapes["residual_layers"],
        "encoder_config": dict(local),
        "dit_config": {
            **local,
            "cfm_config": {"sigma_min": 1e-06, "solver": "euler", "t_scheduler": "log-norm",
                           "training_cfg_rate": 0.1, "inference_cfg_rate": 2.0, "reg_loss_type": "l1",
                           "ratio_r_neq_t_range": [0.25, 0.75], "noise_cond_prob_range": [0.0, 0.0],
                           "noise_cond_scale": 0.0},
        },
        "audio_vae_config": shapes["vae"],
        "max_length": shapes["max_length"],
        "device": "cuda",
        "dtype": dtype,
    }
    if family == "voxcpm":
        config["dit_mean_mode"] = False
    else:
        config["residual_lm_no_rope"] = True
        config["dit_config"]["dit_mean_mode"] = False
    return config


def build_tokenizer(out_dir, vocab_size: int | None = None) -> int:
    """Write a Llama-layout tokenizer (char-level BPE with byte fallback and ▁ word marks); return its size.

    Ids: 0 <unk>, 1 <s>, 2 </s>, 101 <|audio_start|>, 102 <|audio_end|>, 103 <|ref_audio_start|>,
    104 <|ref_audio_end|> (VoxCPM2's reference brackets; unused by 1.5), other ids < 256 reserved specials,
    then the 256 <0xNN> byte tokens, then ▁, ASCII letters/digits/punctuation and common Chinese characters.
    With `vocab_size` the vocabulary is padded to exactly that size (the full model's embedding shape).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    out_dir = Path(out_dir)
    named = {UNK: "<unk>", BOS: "<s>", EOS: "</s>", AUDIO_START: "<|audio_start|>", AUDIO_END: "<|audio_end|>",
             REF_AUDIO_START: "<|ref_audio_start|>", REF_AUDIO_END: "<|ref_audio_end|>"}
    vocab = {named.get(i, f"<|reserved_{i}|>"): i for i in range(256)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁" + string.ascii_letters + string.digits + string.punctuation + _COMMON_HANZI:
        vocab.setdefault(ch, len(vocab))
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size {vocab_size} < {len(vocab)} base tokens")
        for i in range(len(vocab), vocab_size):
            vocab[f"<|pad_{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(list(named.values()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 32768}, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))
    return len(vocab)


def _redraw(name: str, t: torch.Tensor, gen: torch.Generator, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A deterministic random replacement for one tensor: norm scales and Snake alphas near 1, biases
    N(0, 0.01), everything else (weight-norm g/v included) N(0, 0.02). Small weights keep the random
    model's activations finite and its VAE output well inside [-1, 1] (tests compare audio to 1e-4)."""
    if not t.is_floating_point():
        return t.detach().clone()
    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
    if name.endswith("norm.weight") or "layernorm" in name or name.endswith(".alpha"):
        noise.mul_(0.05).add_(1.0)
    elif name.endswith("bias"):
        noise.mul_(0.01)
    else:
        noise.mul_(0.02)
    return noise.to(dtype or t.dtype).contiguous()


def build_checkpoint(out_dir, size: str = "tiny", seed: int = 0, dtype: str = "bfloat16",
                     family: str = "voxcpm") -> Path:
    """Write a random-weight checkpoint (family "voxcpm" = VoxCPM-1.5 or "voxcpm2"; size "tiny" or "full")
    into out_dir; return its Path.

    Deterministic in `seed`. `dtype` is the config's dtype and the dtype of model.safetensors;
    audiovae.pth is always float32 (the package runs the VAE in float32).
    """
    from safetensors.torch import save_file
    from transformers import LlamaTokenizerFast

    from service.engines.voxcpm.load import model_classes  # the worker's loader picks the same classes

    config_cls, model_cls, vae_cls = model_classes(family)
    save_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    out_dir = Path(out_dir)
    _shapes(family, size)  # refuses an unknown family or size before anything is written
    vocab_size = build_tokenizer(out_dir, FULL_VOCAB if size == "full" else None)
    config = _config(size, vocab_size, dtype, family)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))

    cfg = config_cls.model_validate(config)
    cfg.max_length = 16  # only the KV cache depends on it; keep the throwaway model small
    torch.manual_seed(seed)
    model = model_cls(cfg, LlamaTokenizerFast.from_pretrained(str(out_dir)), vae_cls(cfg.audio_vae_config),
                      device="cpu")
    gen_lm, gen_vae = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    # Redraw tensor by tensor, dropping each fp32 original as we go, so the peak stays ~1 model in fp32.
    vae_state = {}
    lm_state = {}
    state = model.state_dict()
    del model
    for name in list(state):
        t = state.pop(name)
        if name.startswith("audio_vae."):
            vae_state[name[len("audio_vae."):]] = _redraw(name, t, gen_vae, torch.float32)
        else:
            lm_state[name] = _redraw(name, t, gen_lm, save_dtype)
        del t
    gc.collect()
    torch.save(vae_state, out_dir / "audiovae.pth")
    del vae_state
    save_file(lm_state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def saved_tensors(ckpt_dir) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under the model's state_dict key (VAE keys prefixed "audio_vae.")."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    saved = dict(load_file(str(ckpt_dir / "model.safetensors")))
    vae = torch.load(ckpt_dir / "audiovae.pth", map_location="cpu", weights_only=True)
    for k, v in vae.get("state_dict", vae).items():
        saved[f"audio_vae.{k}"] = v
    return saved


def load_report(ckpt_dir, model) -> dict[str, list[str]]:
    """Compare every saved tensor with a loaded model (`VoxCPMModel`/`VoxCPM2Model` or a `voxcpm.VoxCPM`).

    The package loads with strict=False, so nothing else notices keys that did not load. Returns
      "missing":    saved keys the model's state_dict lacks (would be silently dropped),
      "mismatched": saved keys whose value in the model differs from the file (compared after casting
                    the saved tensor to the model tensor's dtype, e.g. float32 -> bfloat16),
      "unloaded":   model parameters/persistent buffers no saved tensor provides (LoRA ones excepted).
    All three lists empty means every tensor was loaded and nothing was left at init.
    """
    model = getattr(model, "tts_model", model)
    saved = saved_tensors(ckpt_dir)
    live = model.state_dict()
    missing, mismatched = [], []
    for k, v in saved.items():
        if k not in live:
            missing.append(k)
            continue
        cur = live[k].detach().cpu()
        if cur.shape != v.shape or not torch.equal(cur, v.to(cur.dtype)):
            mismatched.append(k)
    unloaded = [k for k in live if k not in saved and "lora_" not in k]
    return {"missing": sorted(missing), "mismatched": sorted(mismatched), "unloaded": sorted(unloaded)}


def param_count(ckpt_dir) -> tuple[int, int]:
    """(non-VAE parameters in model.safetensors, VAE parameters in audiovae.pth)."""
    from safetensors import safe_open

    ckpt_dir = Path(ckpt_dir)
    lm = 0
    with safe_open(str(ckpt_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            lm += n
    vae = torch.load(ckpt_dir / "audiovae.pth", map_location="cpu", weights_only=True)
    return lm, sum(t.numel() for t in vae.values())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--family", choices=list(FAMILIES), default="voxcpm")
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    out = build_checkpoint(args.out_dir, args.size, args.seed, args.dtype, args.family)
    took = time.monotonic() - t0
    lm, vae = param_count(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(f"built {args.size} {args.family} checkpoint in {out}: {lm / 1e6:.1f}M non-VAE parameters ({args.dtype}), "
          f"{vae / 1e6:.1f}M VAE parameters (float32), {took:.1f}s, peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
