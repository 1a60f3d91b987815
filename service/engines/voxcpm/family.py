"""What the batched step (batch.py) does differently for the two VoxCPM families.

VoxCPM-1.5 (`VoxCPMModel`) and VoxCPM2 (`VoxCPM2Model`) run the same generation loop on the same kinds
of modules; VoxCPM2 differs in a few places, each followed here exactly as its package code does it:
- the residual LM reads the base LM's output and the audio embedding through `fusion_concat_proj`
  (1.5: their sum), in the prefill and in every step;
- the local DiT is conditioned on both LMs' projections side by side (1.5: their sum);
- a reference clip (reference cloning) goes ahead of the text between tokens 103 and 104, the prompt's
  text is not read then; a continuation prompt's text and audio are used as in 1.5 (both combine);
- a continuation prompt's last 3 patches (1.5: 2) prime the decoder, as the package's generate decodes them;
- AudioVAE V2 encodes at 16 kHz and decodes at 48 kHz: a token is more samples out than in.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


def samples_per_token(model) -> int:
    """Output samples per token: AudioVAE V2 upsamples by decode_chunk_size, not the encoder's chunk."""
    return model.patch_size * getattr(model, "_decode_chunk_size", model.chunk_size)


class Inputs(NamedTuple):
    """One request's prefill inputs (batch of one, on the device) and facts the batch needs of them."""
    tokens: torch.Tensor  # [1, n]
    text_mask: torch.Tensor  # [1, n]
    feat: torch.Tensor  # [1, n, P, D]
    feat_mask: torch.Tensor  # [1, n]
    target_len: int  # text tokens of the target text alone (the length cap's base)
    context: int  # the last audio positions (feat_mask 1) that prime the streaming decoder


class Family:
    """The family-specific parts of one model's batched step."""

    def __init__(self, model):
        self.m = model
        # VoxCPM2's marks of difference; absent on VoxCPM-1.5's model.
        self.fusion = getattr(model, "fusion_concat_proj", None)
        self.v2 = self.fusion is not None
        self.name = "voxcpm2" if self.v2 else "voxcpm"
        # The package's streaming_prefix_len - 1: the prompt patches its generate decodes ahead of the
        # first generated one (and cuts off).
        self.context_patches = 3 if self.v2 else 2
        self.samples_per_token = samples_per_token(model)

    def residual_input(self, lm_out: torch.Tensor, audio_embed: torch.Tensor) -> torch.Tensor:
        """What the residual LM reads: the base LM's (quantised) output with the audio embedding."""
        if self.fusion is None:
            return lm_out + audio_embed
        return self.fusion(torch.cat((lm_out, audio_embed), dim=-1))

    def dit_condition(self, lm_hidden: torch.Tensor, res_hidden: torch.Tensor) -> torch.Tensor:
        """The local DiT's conditioning vector (mu) from both LMs' hidden states."""
        a, b = self.m.lm_to_dit_proj(lm_hidden), self.m.res_to_dit_proj(res_hidden)
        return torch.cat((a, b), dim=-1) if self.v2 else a + b

    def inputs(self, target_text: str, prompt_cache: Optional[dict], device, dtype) -> Inputs:
        """Token and feature inputs, laid out like the package's _generate_with_prompt_cache.

        A prompt cache is the package's: {"prompt_text", "audio_feat"} for continuation (VoxCPM-1.5's
        only kind), and for VoxCPM2 also {"ref_audio_feat"} with "mode" reference or ref_continuation.
        """
        m = self.m
        p, d = m.patch_size, m.audio_vae.latent_dim
        mode = "zero_shot" if prompt_cache is None else prompt_cache.get("mode", "continuation")
        if mode not in ("zero_shot", "continuation", "reference", "ref_continuation"):
            raise ValueError(f"unknown prompt mode {mode!r}")
        continuation = mode in ("continuation", "ref_continuation")
        text = prompt_cache.get("prompt_text", "") + target_text if continuation else target_text
        text_tokens = torch.cat([torch.LongTensor(m.text_tokenizer(text)), torch.tensor([m.audio_start_token])])
        n = text_tokens.shape[0]
        tokens, feats = [text_tokens], [torch.zeros((n, p, d))]
        text_mask, feat_mask = [torch.ones(n, dtype=torch.int32)], [torch.zeros(n, dtype=torch.int32)]
        if mode in ("reference", "ref_continuation"):
            if not self.v2:
                raise ValueError(f"reference prompts need a VoxCPM2 model; this is {self.name}")
            ref = m._make_ref_prefix(prompt_cache["ref_audio_feat"], torch.device("cpu"))
            for parts, part in zip((tokens, feats, text_mask, feat_mask), ref):
                parts.insert(0, part.to(parts[0].dtype))
        if continuation:
            audio = prompt_cache["audio_feat"].float()
            k = audio.shape[0]
            tokens.append(torch.zeros(k, dtype=torch.long))
            feats.append(audio)
            text_mask.append(torch.zeros(k, dtype=torch.int32))
            feat_mask.append(torch.ones(k, dtype=torch.int32))
        feat_mask = torch.cat(feat_mask)
        # The package primes its decoder only when the sequence ends with prompt audio (a continuation),
        # with the last audio positions (a reference clip's too, behind a prompt shorter than that).
        context = min(self.context_patches, int(feat_mask.sum())) if continuation else 0
        return Inputs(torch.cat(tokens).unsqueeze(0).to(device), torch.cat(text_mask).unsqueeze(0).to(device),
                      torch.cat(feats).unsqueeze(0).to(device).to(dtype), feat_mask.unsqueeze(0).to(device),
                      len(m.text_tokenizer(target_text)), context)
