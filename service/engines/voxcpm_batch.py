"""Continuous batching for VoxCPM: many requests share each generation step of one model.

The package generates one request at a time (a batch-1 KV cache held by the model, one position for
the whole batch). This generator keeps its own batched KV caches for the text-semantic LM and the
residual LM, with a position per row, and runs the package's own modules (weights, RoPE, local
DiT solver, local encoder, stop head, VAE) on all active rows at once. Requests join between steps
(prefilled alone with the package's own forward, then copied into a free row) and leave when they
stop, so a long request never holds short ones back.

Numerically each row follows the package's generation loop step for step: the same stop rule and
length clamp, the same streaming VAE decode, and diffusion noise from a per-request generator
seeded like the package's global RNG (tests/test_voxcpm_batching.py checks equality with the
package generating each request alone).

Not thread-safe: the scheduler's inference thread is the only caller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from einops import rearrange

_STREAMING_PREFIX = 3  # patches decoded together for one streamed chunk, as the package does
_SWAY = 1.0


@dataclass
class _Row:
    max_len: int
    min_len: int
    timesteps: int
    cfg: float
    generator: torch.Generator
    step: int = 0
    recent: list = field(default_factory=list)  # last patches [1, 1, P, D] for the streaming decode


@dataclass
class Join:
    """A request joining the batch (the arguments of the package's generate)."""
    text: str
    prompt_cache: Optional[dict] = None
    max_len: int = 2000
    min_len: int = 2
    inference_timesteps: int = 10
    cfg_value: float = 2.0
    seed: Optional[int] = None
    # Like the package, generation is capped at length_ratio tokens per text token (+10) against
    # runaway audio; None lifts that cap (fixed-length benchmarks).
    length_ratio: Optional[float] = 6.0


class BatchedGenerator:
    def __init__(self, model, max_batch: int, max_length: Optional[int] = None):
        self.m = model
        # Eager modules: the package's torch.compile'd ones (reduce-overhead, CUDA graphs) are built
        # for batch 1 and would recompile for every batch size.
        self.feat_encoder = _eager(model.feat_encoder)
        self.estimator = _eager(model.feat_decoder.estimator)
        self.max_batch = max_batch
        self.device = model.device
        self.dtype = next(model.base_lm.parameters()).dtype
        self.max_length = max_length or model.config.max_length
        self.base_kv = self._alloc(model.base_lm)
        self.res_kv = self._alloc(model.residual_lm)
        h = model.config.lm_config.hidden_size
        p, d = model.patch_size, model.audio_vae.latent_dim
        self.lm_hidden = torch.zeros(max_batch, h, device=self.device, dtype=self.dtype)
        self.res_hidden = torch.zeros(max_batch, h, device=self.device, dtype=self.dtype)
        self.cond = torch.zeros(max_batch, p, d, device=self.device, dtype=self.dtype)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # next KV slot per row
        self._pos = [0] * max_batch  # the same on the host, so sizing attention needs no device sync
        self.rows: dict[int, _Row] = {}
        self.last_patch: dict[int, torch.Tensor] = {}  # row -> latent patch [P, D] of the latest step

    def _alloc(self, lm) -> torch.Tensor:
        cfg = lm.config
        head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
        return torch.zeros(2, cfg.num_hidden_layers, self.max_batch, cfg.num_key_value_heads, self.max_length,
                           head_dim, device=self.device, dtype=self.dtype)

    # -- bookkeeping -----------------------------------------------------------------------------
    def active(self) -> int:
        return len(self.rows)

    def free_slots(self) -> int:
        return self.max_batch - len(self.rows)

    def cancel(self, row: int) -> None:
        self.rows.pop(row, None)

    # -- joining ---------------------------------------------------------------------------------
    def add(self, text: str, prompt_cache: Optional[dict] = None, max_len: int = 2000, min_len: int = 2,
            inference_timesteps: int = 10, cfg_value: float = 2.0, seed: Optional[int] = None,
            length_ratio: Optional[float] = 6.0) -> int:
        """Prefill one new row; see add_many."""
        return self.add_many([Join(text, prompt_cache, max_len, min_len, inference_timesteps, cfg_value, seed,
                                   length_ratio)])[0]

    @torch.inference_mode()
    def add_many(self, joins: list[Join]) -> list[int]:
        """Prefill new rows, all in one forward pass per LM; returns their row numbers.

        Requests arriving together (a burst of users, or the next sentences of several) would
        otherwise be prefilled one after another, each a full pass over both LMs, and the last one's
        first audio would wait for all of them. Inputs are right-padded to the longest: attention is
        causal, so a real token never sees the padding, and each row's KV cache takes only its own
        positions (padding slots are overwritten by generated tokens before they are ever attended).
        """
        if len(joins) > self.free_slots():
            raise RuntimeError(f"no free batch slot for {len(joins)} request(s) ({self.free_slots()} free); "
                               "wait for rows to finish")
        steps = {j.inference_timesteps for j in joins} | ({self._timesteps()} if self.rows else set())
        if len(steps) > 1:
            raise ValueError("every row of a batch must use the same inference_timesteps")
        inputs = [self._inputs(j.text, j.prompt_cache) for j in joins]
        lengths = [x[0].shape[1] for x in inputs]
        if max(lengths) >= self.max_length:
            raise ValueError(f"text and prompt take {max(lengths)} tokens; the cache holds {self.max_length}")
        m = self.m
        text_token, text_mask, feat, feat_mask = (torch.cat([_pad(x[k], max(lengths)) for x in inputs])
                                                  for k in range(4))
        # The package's own (non-step) forward, exactly as its _inference does, on all of them.
        feat_embed = m.enc_to_lm_proj(self.feat_encoder(feat))
        scale = m.config.lm_config.scale_emb if m.config.lm_config.use_mup else 1.0
        text_embed = m.base_lm.embed_tokens(text_token) * scale
        combined = text_mask.unsqueeze(-1) * text_embed + feat_mask.unsqueeze(-1) * feat_embed
        enc_out, kv = m.base_lm(inputs_embeds=combined, is_causal=True)
        enc_out = m.fsq_layer(enc_out) * feat_mask.unsqueeze(-1) + enc_out * text_mask.unsqueeze(-1)
        res_out, res_kv = m.residual_lm(inputs_embeds=enc_out + feat_mask.unsqueeze(-1) * feat_embed, is_causal=True)

        free = sorted(set(range(self.max_batch)) - set(self.rows))  # lowest free rows keep the batch compact
        added = []
        for i, (join, n, row) in enumerate(zip(joins, lengths, free)):
            self._fill(self.base_kv, row, kv, i, n)
            self._fill(self.res_kv, row, res_kv, i, n)
            self.lm_hidden[row] = enc_out[i, n - 1]
            self.res_hidden[row] = res_out[i, n - 1]
            self.cond[row] = feat[i, n - 1]
            self.pos[row] = self._pos[row] = n
            gen = torch.Generator(device=self.device)
            gen.manual_seed(join.seed if join.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item()))
            recent = []
            n_prompt = int(feat_mask[i].sum().item())
            if n_prompt:
                context = min(_STREAMING_PREFIX - 1, n_prompt)
                recent = list(feat[i:i + 1, n - context:n].split(1, dim=1))
            target_len = inputs[i][4]
            cap = join.max_len if join.length_ratio is None else int(target_len * join.length_ratio + 10)
            room = self.max_length - n  # KV slots left for generated tokens in this row
            self.rows[row] = _Row(max_len=min(cap, join.max_len, room), min_len=join.min_len,
                                  timesteps=join.inference_timesteps, cfg=float(join.cfg_value), generator=gen,
                                  recent=recent)
            added.append(row)
        return added

    def _timesteps(self) -> int:
        return next(iter(self.rows.values())).timesteps

    def _inputs(self, target_text: str, prompt_cache: Optional[dict]):
        """Token and feature inputs, built like the package's _generate_with_prompt_cache."""
        m = self.m
        if prompt_cache is None:
            prompt_feat = torch.empty((0, m.patch_size, m.audio_vae.latent_dim), dtype=torch.float32)
            text = target_text
        else:
            prompt_feat = prompt_cache["audio_feat"]
            text = prompt_cache["prompt_text"] + target_text
        tokens = torch.cat([torch.LongTensor(m.text_tokenizer(text)), torch.tensor([m.audio_start_token])])
        audio_len, text_len = prompt_feat.size(0), tokens.shape[0]
        tokens = torch.cat([tokens, torch.zeros(audio_len, dtype=torch.long)])
        feat = torch.cat([torch.zeros((text_len, m.patch_size, m.audio_vae.latent_dim)), prompt_feat], dim=0)
        text_mask = torch.cat([torch.ones(text_len), torch.zeros(audio_len)]).to(torch.int32)
        feat_mask = torch.cat([torch.zeros(text_len), torch.ones(audio_len)]).to(torch.int32)
        dev = self.device
        return (tokens.unsqueeze(0).to(dev), text_mask.unsqueeze(0).to(dev),
                feat.unsqueeze(0).to(dev).to(self.dtype), feat_mask.unsqueeze(0).to(dev),
                len(m.text_tokenizer(target_text)))

    def _fill(self, cache: torch.Tensor, row: int, kv: list, i: int, n: int) -> None:
        """Row `row` of the cache takes the first n positions of prefill item i."""
        cache[:, :, row].zero_()
        for layer, (k, v) in enumerate(kv):
            cache[0, layer, row, :, :n] = k[i, :, :n]
            cache[1, layer, row, :, :n] = v[i, :, :n]

    # -- one step for every active row -------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[int, np.ndarray, bool]]:
        if not self.rows:
            return []
        m = self.m
        idx = torch.tensor(sorted(self.rows), device=self.device)
        rows = [self.rows[int(r)] for r in idx.tolist()]
        b = len(rows)
        dit_hidden = m.lm_to_dit_proj(self.lm_hidden[idx]) + m.res_to_dit_proj(self.res_hidden[idx])
        cfm = m.feat_decoder
        z = torch.cat([torch.randn((1, cfm.in_channels, m.patch_size), generator=r.generator, device=self.device,
                                   dtype=dit_hidden.dtype) for r in rows])
        n = rows[0].timesteps
        t_span = torch.linspace(1, 0, n + 1, device=self.device, dtype=dit_hidden.dtype)
        t_span = t_span + _SWAY * (torch.cos(torch.pi / 2 * t_span) - 1 + t_span)
        cfg = torch.tensor([r.cfg for r in rows], device=self.device, dtype=dit_hidden.dtype).view(b, 1, 1)
        compiled, cfm.estimator = cfm.estimator, self.estimator
        try:
            pred = cfm.solve_euler(x=z, t_span=t_span, mu=dit_hidden, cond=self.cond[idx].transpose(1, 2).contiguous(),
                                   cfg_value=cfg, use_cfg_zero_star=True).transpose(1, 2)  # [b, P, D]
        finally:
            cfm.estimator = compiled
        curr = m.enc_to_lm_proj(self.feat_encoder(pred.unsqueeze(1)))[:, 0]  # [b, H]
        self.cond[idx] = pred
        stop = m.stop_head(m.stop_actn(m.stop_proj(self.lm_hidden[idx]))).argmax(dim=-1).tolist()

        row_ids = idx.tolist()
        done = []
        for j, (row_id, r) in enumerate(zip(row_ids, rows)):
            r.recent = (r.recent + [pred[j:j + 1].unsqueeze(1)])[-_STREAMING_PREFIX:]
            self.last_patch[row_id] = pred[j]
            done.append((r.step > r.min_len and stop[j] == 1) or r.step + 1 >= r.max_len)
            r.step += 1
        audio = self._decode(rows)
        out = list(zip(row_ids, audio, done))
        keep = [j for j, d in enumerate(done) if not d]
        for row_id, d in zip(row_ids, done):
            if d:
                del self.rows[row_id]
        if keep:
            k = torch.tensor(keep, device=self.device)
            kidx = idx[k]
            live = max(self._pos[row_ids[j]] for j in keep) + 1  # attend over the filled prefix only
            lm = self._lm_step(m.base_lm, self.base_kv, curr[k], kidx, live)
            lm = m.fsq_layer(lm)
            self.lm_hidden[kidx] = lm
            self.res_hidden[kidx] = self._lm_step(m.residual_lm, self.res_kv, lm + curr[k], kidx, live)
            self.pos[kidx] += 1
            for j in keep:
                self._pos[row_ids[j]] += 1
        return out

    def _decode(self, rows: list[_Row]) -> list[np.ndarray]:
        """The newest 160 ms of audio per row, like the package's streaming decode of its last patches.

        Rows with the same number of recent patches (all of them, after the first two steps) are
        decoded in one VAE call, and everything comes to the host in one copy.
        """
        m = self.m
        n = m.patch_size * m.chunk_size
        groups: dict[int, list[int]] = {}
        for j, r in enumerate(rows):
            groups.setdefault(len(r.recent), []).append(j)
        audio = torch.empty(len(rows), n, device=self.device, dtype=torch.float32)
        for js in groups.values():
            recent = torch.cat([torch.cat(rows[j].recent, dim=1) for j in js])  # [g, t, P, D]
            feat = rearrange(recent, "b t p d -> b d (t p)", p=m.patch_size)
            decoded = m.audio_vae.decode(feat.to(torch.float32))
            audio[js] = decoded[..., -n:].reshape(len(js), n).float()
        return list(audio.cpu().numpy())

    def _lm_step(self, lm, cache: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, live: int) -> torch.Tensor:
        """MiniCPMModel.forward_step with a position per row (the package's takes one for all).

        Attention reads only the first `live` KV slots (the longest row's filled prefix), not the
        whole cache: masked slots add nothing but memory traffic, which dominates at large batches.
        """
        pos = self.pos[rows]
        cos = sin = None
        if lm.rope_emb is not None:
            cos, sin = lm.rope_emb(pos)
            cos, sin = cos[:, None, None, :], sin[:, None, None, :]
        mask = (torch.arange(live, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
        h = x
        for i, layer in enumerate(lm.layers):
            residual = h
            a = layer.self_attn
            hn = layer.input_layernorm(h)
            b = hn.size(0)
            q = a.q_proj(hn).view(b, 1, a.num_heads, a.head_dim).transpose(1, 2)
            k = a.k_proj(hn).view(b, 1, a.num_key_value_heads, a.head_dim).transpose(1, 2)
            v = a.v_proj(hn).view(b, 1, a.num_key_value_heads, a.head_dim).transpose(1, 2)
            if cos is not None:
                q, k = _rope(q, k, cos, sin)
            kc, vc = cache[0, i], cache[1, i]
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            attn = torch.nn.functional.scaled_dot_product_attention(
                q.contiguous(), kc[rows, :, :live], vc[rows, :, :live], attn_mask=mask, enable_gqa=True)
            h = a.o_proj(attn.transpose(1, 2).reshape(b, a.num_heads * a.head_dim))
            h = residual + (h * (layer.scale_depth / math.sqrt(layer.num_hidden_layers)) if layer.use_mup else h)
            residual = h
            h = layer.mlp(layer.post_attention_layernorm(h))
            h = residual + (h * (layer.scale_depth / math.sqrt(layer.num_hidden_layers)) if layer.use_mup else h)
        return lm.norm(h)


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad dim 1 of a batch-1 input with zeros to `length`."""
    if t.shape[1] == length:
        return t
    pad = torch.zeros((t.shape[0], length - t.shape[1], *t.shape[2:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)


def _eager(module):
    return getattr(module, "_orig_mod", module)


def _rope(q, k, cos, sin):
    from voxcpm.modules.minicpm4.model import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def pick_max_batch(free_bytes: int, model, cap: int) -> int:
    """Rows that fit in `free_bytes`: both LMs' KV caches at full length, plus working memory."""
    per_row = 0
    for lm in (model.base_lm, model.residual_lm):
        c = lm.config
        head_dim = c.kv_channels or c.hidden_size // c.num_attention_heads
        per_row += 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.config.max_length * 2  # bf16
    per_row = int(per_row * 1.5)  # activations of the local DiT (CFG doubles it), VAE decode, allocator slack
    return max(1, min(cap, int(free_bytes * 0.8) // max(per_row, 1)))
