"""Continuous batching for VoxCPM (1.5 and VoxCPM2): many requests share each generation step of one model.

The package generates one request at a time (a batch-1 KV cache held by the model, one position for
the whole batch). This generator keeps its own batched state and runs the package's own modules
(weights, RoPE, local DiT, local encoder, stop head) on all rows at once. Requests join between steps
(prefilled together with the package's own forward, then copied into free rows) and leave when they
stop, so a long request never holds short ones back.

The step is built to be captured in CUDA graphs (one replay instead of thousands of kernel launches):
- every per-row value lives in preallocated device tensors: KV caches, hidden states, positions,
  step counters, CFG values, each row's diffusion time grid, and each row's noise for every step it
  may take (drawn once when it joins, from its own seeded generator);
- rows are kept packed at the front of the buffers and the step runs on a bucket of b rows (1, 2, 4,
  ... max_batch), the rows past the live ones being idle padding whose results are ignored; attention
  reads a bucketed prefix of the KV cache, and the DiT solver runs as many iterations as the row with
  the most steps (rows with fewer hold still: their time step is zero), so requests with different
  `inference_timesteps` share one step;
- nothing in the step reads a value back to the host or branches on one: the host mirrors positions
  and step counts (they advance by one per step), and the stop flags come back once per step with the
  audio, in one copy.
The VAE decode is streamed with carried convolution state (vae_stream.py): each step decodes
only its own patch, and the audio equals decoding the whole sequence at once.

The two families share this step; where VoxCPM2's model differs (its residual LM's input fusion, DiT
conditioning, reference-clip prompts, 48 kHz decoder) family.py says how.

Numerically each row follows the package's generation loop step for step: the same stop rule and
length clamp, the same solver arithmetic, and noise from a generator seeded like the package's global
RNG (tests/test_voxcpm_batching.py and tests/test_voxcpm2_batching.py check equality with the package
generating each request alone).

Not thread-safe: the scheduler's inference thread is the only caller (CUDA graphs are thread-local).
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from .family import Family
from .vae_stream import StreamingDecoder

log = logging.getLogger(__name__)

_SWAY = 1.0  # the package's sway_sampling_coef
_MIN_LENGTH_BUCKET = 256  # KV positions attention reads at least (the smallest length bucket)


@dataclass
class Join:
    """A request joining the batch (the arguments of the package's generate; prompt_cache as its
    build_prompt_cache makes it for the model's family, see family.py)."""
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


class StepOutput(NamedTuple):
    """One row's result of a step: its handle, 160 ms of audio, whether the row has finished."""
    row: int
    audio: np.ndarray
    done: bool


@dataclass
class _Slot:
    """Host-side facts of a live row (mirrors of what the device holds, so the step never asks it)."""
    handle: int
    max_len: int
    min_len: int
    timesteps: int
    pos: int  # next KV position
    step: int = 0


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes the step runs at: powers of two below max_batch, and max_batch itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if (1 << i) < max_batch]
    return tuple(sizes + [max_batch])


def length_buckets(max_length: int) -> tuple[int, ...]:
    sizes = [1 << i for i in range(max_length.bit_length()) if _MIN_LENGTH_BUCKET <= (1 << i) < max_length]
    return tuple(sizes + [max_length])


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding n (buckets ascending); n beyond the largest is a caller's bug."""
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class GraphCache:
    """Runs a step function through a CUDA graph per static shape key; plain eager calls elsewhere.

    A new key's first call runs eagerly (that step's real work; it also initialises kernels and
    workspaces) and is then captured, so every later call with that key is one graph replay. Functions
    read and write only preallocated tensors, so a replay needs no inputs or outputs of its own; all
    graphs share one memory pool (they never run concurrently). A capture that fails turns graphs off
    for this generator, logged, and the step goes on eagerly.

    Captures run on `device` (the tensors' GPU), whatever the calling thread's current device: a capture
    stream of another GPU records none of the work, which then runs eagerly during the capture. They are
    thread-local: each model of a worker has its own inference thread (service/models.py), and a global
    capture would make the other threads' CUDA calls (an allocation, a synchronisation) fail meanwhile.
    """

    def __init__(self, enabled: bool, device=None):
        self.enabled = enabled
        self.device = device
        self.graphs: dict = {}
        self._pool = None

    def run(self, key, fn: Callable[[], None]) -> None:
        graph = self.graphs.get(key) if self.enabled else None
        if graph is not None:
            graph.replay()
            return
        fn()
        if self.enabled:
            self._capture(key, fn)

    def _capture(self, key, fn) -> None:
        try:
            with torch.cuda.device(self.device):
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    fn()
            self.graphs[key] = graph
        except Exception:  # an op that cannot be captured: correct but slower, and visible in the log
            log.exception("voxcpm: CUDA graph capture failed for %s; the batched step runs eagerly", key)
            self.enabled = False
            self.graphs.clear()


class BatchedGenerator:
    def __init__(self, model, max_batch: int, max_length: Optional[int] = None, max_steps: Optional[int] = None,
                 max_timesteps: int = 100, cuda_graphs: bool = True, compile_backend: Optional[str] = None,
                 record_latents: bool = False):
        """max_length: KV positions per row (prompt + text + generated); max_steps: tokens a row may
        generate (noise is drawn for that many); max_timesteps: the largest inference_timesteps;
        compile_backend: torch.compile the step's parts with it ("inductor": fused kernels, then
        captured in the CUDA graphs like the eager ones; None: eager kernels)."""
        self.m = model
        self.family = Family(model)
        # Eager modules: the package's torch.compile'd ones (reduce-overhead, CUDA graphs) are built
        # for batch 1 and would recompile for every batch size.
        self.feat_encoder = _eager(model.feat_encoder)
        self.estimator = _eager(model.feat_decoder.estimator)
        self.max_batch = max_batch
        self.device = torch.device(model.device)
        self.dtype = next(model.base_lm.parameters()).dtype
        self.max_length = max_length or model.config.max_length
        self.max_steps = min(max_steps or self.max_length, self.max_length)
        self.max_timesteps = max_timesteps
        self.buckets = batch_buckets(max_batch)
        self.lengths = length_buckets(self.max_length)
        self.record_latents = record_latents
        self.last_patch: dict[int, torch.Tensor] = {}  # handle -> this step's latent patch [P, D] (record_latents)
        self.graphs = GraphCache(cuda_graphs and self.device.type == "cuda", self.device)

        b, dev, dt = max_batch, self.device, self.dtype
        h = model.config.lm_config.hidden_size
        p, d = model.patch_size, model.audio_vae.latent_dim
        c = model.feat_decoder.in_channels
        self.base_kv = self._alloc(model.base_lm)
        self.res_kv = self._alloc(model.residual_lm)
        self.lm_hidden = torch.zeros(b, h, device=dev, dtype=dt)
        self.res_hidden = torch.zeros(b, h, device=dev, dtype=dt)
        self.cond = torch.zeros(b, p, d, device=dev, dtype=dt)  # each row's previous patch (DiT prefix)
        self.pos = torch.zeros(b, dtype=torch.long, device=dev)
        self.step_idx = torch.zeros(b, dtype=torch.long, device=dev)
        self.live = torch.zeros(b, dtype=torch.long, device=dev)  # 1 for live rows, 0 for padding
        self.cfg = torch.zeros(b, device=dev, dtype=dt)
        self.timesteps = torch.zeros(b, dtype=torch.long, device=dev)
        self.zero_init = torch.zeros(b, dtype=torch.long, device=dev)
        self.t_grid = torch.zeros(b, max_timesteps + 2, device=dev, dtype=dt)
        self.noise = torch.zeros(b, self.max_steps, c, p, device=dev, dtype=dt)
        self.rows_idx = torch.arange(b, device=dev)
        # Step outputs
        self.pred = torch.zeros(b, p, d, device=dev, dtype=dt)
        self.curr = torch.zeros(b, h, device=dev, dtype=dt)
        self.stop = torch.zeros(b, dtype=torch.long, device=dev)
        self.audio = torch.zeros(b, self.family.samples_per_token, device=dev, dtype=torch.float32)
        self.decoder = StreamingDecoder(model.audio_vae, b, dev)
        # Per-row tensors moved together when rows are repacked (KV caches move separately).
        self._row_tensors = [self.lm_hidden, self.res_hidden, self.cond, self.pos, self.step_idx, self.live,
                             self.cfg, self.timesteps, self.zero_init, self.t_grid, self.noise]
        if compile_backend:
            # Each part traces as one graph (tests prove it on the CPU); batch and length are
            # made symbolic after the first recompile, so one compile serves every bucket.
            for name in ("dit_step", "lm_step", "vae_step"):
                setattr(self, name, torch.compile(getattr(self, name), backend=compile_backend, fullgraph=True))
        self.slots: list[_Slot] = []  # live rows, packed: slot i is row i of every buffer
        self._handles = itertools.count()
        pinned = dev.type == "cuda"
        self._stop_host = torch.zeros(b, dtype=torch.long, pin_memory=pinned)
        self._audio_host = torch.zeros(b, self.family.samples_per_token, dtype=torch.float32, pin_memory=pinned)

    def _alloc(self, lm) -> torch.Tensor:
        cfg = lm.config
        head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
        return torch.zeros(2, cfg.num_hidden_layers, self.max_batch, cfg.num_key_value_heads, self.max_length,
                           head_dim, device=self.device, dtype=self.dtype)

    # -- bookkeeping -----------------------------------------------------------------------------
    def active(self) -> int:
        return len(self.slots)

    def free_slots(self) -> int:
        return self.max_batch - len(self.slots)

    def cancel(self, row: int) -> None:
        """Drop a row (its handle) between steps; unknown or finished handles are ignored."""
        gone = [i for i, s in enumerate(self.slots) if s.handle == row]
        if gone:
            self._release(gone)

    def _release(self, leaving: list[int]) -> None:
        """Remove slots and keep the live rows packed: the last rows move into the holes."""
        n, leaving_set = len(self.slots), set(leaving)
        keep = n - len(leaving_set)
        holes = [i for i in sorted(leaving_set) if i < keep]
        movers = [i for i in range(keep, n) if i not in leaving_set]
        if holes:
            span = max(self.slots[i].pos for i in movers) + 1  # KV positions worth copying
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            for t in self._row_tensors:
                t.index_copy_(0, dst, t.index_select(0, src))
            for kv in (self.base_kv, self.res_kv):
                kv[:, :, dst, :, :span] = kv[:, :, src, :, :span]
            self.decoder.move(src, dst)
            for h, m in zip(holes, movers):
                self.slots[h] = self.slots[m]
        del self.slots[keep:]
        self._idle_from(keep)

    def _idle_from(self, first: int) -> None:
        """Rows from `first` on become padding. Idle rows stay at position 0: padding never writes past
        the cache, whatever it computes (a row left live would advance until it indexed beyond it)."""
        rows = self.rows_idx[first:]
        for t in (self.live, self.pos, self.step_idx):
            t.index_fill_(0, rows, 0)

    # -- joining ---------------------------------------------------------------------------------
    def add(self, text: str, prompt_cache: Optional[dict] = None, **join) -> int:
        """Prefill one new row (`join`: the rest of Join's fields); see add_many."""
        return self.add_many([Join(text, prompt_cache, **join)])[0]

    @torch.inference_mode()
    def add_many(self, joins: list[Join]) -> list[int]:
        """Prefill new rows, all in one forward pass per LM; returns their handles.

        Requests arriving together (a burst of users, or the next sentences of several) would
        otherwise be prefilled one after another, each a full pass over both LMs, and the last one's
        first audio would wait for all of them. Inputs are right-padded to the longest: attention is
        causal, so a real token never sees the padding, and each row's KV cache takes only its own
        positions (padding slots are overwritten by generated tokens before they are ever attended).
        """
        if not joins:
            return []
        if len(joins) > self.free_slots():
            raise RuntimeError(f"no free batch slot for {len(joins)} request(s) ({self.free_slots()} free); "
                               "wait for rows to finish")
        for j in joins:
            if not 1 <= j.inference_timesteps <= self.max_timesteps:
                raise ValueError(f"inference_timesteps must be between 1 and {self.max_timesteps}")
        inputs = [self.family.inputs(j.text, j.prompt_cache, self.device, self.dtype) for j in joins]
        lengths = [x.tokens.shape[1] for x in inputs]
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
        res_in = self.family.residual_input(enc_out, feat_mask.unsqueeze(-1) * feat_embed)
        res_out, res_kv = m.residual_lm(inputs_embeds=res_in, is_causal=True)

        first, handles = len(self.slots), []
        try:
            for i, (join, n) in enumerate(zip(joins, lengths)):
                row = len(self.slots)
                self._fill(self.base_kv, row, kv, i, n)
                self._fill(self.res_kv, row, res_kv, i, n)
                self.lm_hidden[row] = enc_out[i, n - 1]
                self.res_hidden[row] = res_out[i, n - 1]
                self.cond[row] = feat[i, n - 1]
                target_len = inputs[i].target_len
                cap = join.max_len if join.length_ratio is None else int(target_len * join.length_ratio + 10)
                max_len = min(cap, join.max_len, self.max_length - n, self.max_steps)
                self._set_row(row, n, join, max_len)
                self.decoder.reset(self.rows_idx[row:row + 1])
                if inputs[i].context:  # the package decodes a prompt's last patches ahead of the first generated one
                    audio_at = feat_mask[i, :n].nonzero().squeeze(1)[-inputs[i].context:]
                    context = feat[i, audio_at]  # [t, P, D]
                    self.decoder.prime(row, context.reshape(-1, context.shape[-1]).T.float())
                handle = next(self._handles)
                self.slots.append(_Slot(handle, max_len=max_len, min_len=join.min_len,
                                        timesteps=join.inference_timesteps, pos=n))
                handles.append(handle)
        except BaseException:
            # A join failing part-way (a device out of memory) leaves no row behind: rows added before it
            # would generate with no owner, and a half-set one would advance as live padding.
            del self.slots[first:]
            self._idle_from(first)
            raise
        return handles

    def _set_row(self, row: int, n: int, join: Join, max_len: int) -> None:
        """The row's per-step values, as the package's generate would use them."""
        steps = join.inference_timesteps
        self.pos[row], self.step_idx[row], self.live[row] = n, 0, 1
        self.cfg[row] = float(join.cfg_value)
        self.timesteps[row] = steps
        self.zero_init[row] = max(1, int((steps + 1) * 0.04))  # UnifiedCFM.solve_euler's CFG-zero* steps
        t_span = torch.linspace(1, 0, steps + 1, device=self.device, dtype=self.dtype)
        self.t_grid[row].zero_()
        self.t_grid[row, :steps + 1] = t_span + _SWAY * (torch.cos(torch.pi / 2 * t_span) - 1 + t_span)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(join.seed if join.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item()))
        # Drawn in one call: on the CPU the same numbers as the package's one draw per step.
        self.noise[row, :max_len] = torch.randn(self.noise.shape[1:], generator=gen, device=self.device,
                                                dtype=self.dtype)[:max_len]

    def _fill(self, cache: torch.Tensor, row: int, kv: list, i: int, n: int) -> None:
        """Row `row` of the cache takes the first n positions of prefill item i."""
        cache[:, :, row].zero_()
        for layer, (k, v) in enumerate(kv):
            cache[0, layer, row, :, :n] = k[i, :, :n]
            cache[1, layer, row, :, :n] = v[i, :, :n]

    # -- one step for every live row -------------------------------------------------------------
    def shapes(self) -> tuple[int, int, int]:
        """(batch bucket, attention length bucket, solver iterations) of the next step: host facts only."""
        n = len(self.slots)
        return (bucket_for(n, self.buckets), bucket_for(max(s.pos for s in self.slots) + 1, self.lengths),
                max(s.timesteps for s in self.slots))

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        if not self.slots:
            return []
        b, length, iters = self.shapes()
        self._dit(b, iters)
        self._lm(b, length)
        self._vae(b)
        n = len(self.slots)
        # The one device-to-host transfer of the step: stop flags and audio, then one wait.
        self._stop_host[:n].copy_(self.stop[:n], non_blocking=True)
        self._audio_host[:n].copy_(self.audio[:n], non_blocking=True)
        if self.record_latents:
            patches = self.pred[:n].float().cpu().clone()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        # A copy per row: a view of one array would keep every row's audio alive as long as any one row's
        # piece is held (a sentence waiting to be stretched or carried, a slow client's queue).
        stop, audio = self._stop_host[:n].tolist(), [a.copy() for a in self._audio_host[:n].numpy()]
        self.last_patch = {}
        out, finished = [], []
        for i, s in enumerate(self.slots):
            done = (s.step > s.min_len and stop[i] == 1) or s.step + 1 >= s.max_len
            s.step += 1
            s.pos += 1
            if self.record_latents:
                self.last_patch[s.handle] = patches[i]
            out.append(StepOutput(s.handle, audio[i], done))
            if done:
                finished.append(i)
        if finished:
            self._release(finished)
        return out

    # The three parts of a step through their graphs: the one place that names a part's graph key, so the
    # graphs prepare() captures are the ones step() replays.
    def _dit(self, b: int, iters: int) -> None:
        self.graphs.run(("dit", b, iters), lambda: self.dit_step(b, iters))

    def _lm(self, b: int, length: int) -> None:
        self.graphs.run(("lm", b, length), lambda: self.lm_step(b, length))

    def _vae(self, b: int) -> None:
        self.graphs.run(("vae", b), lambda: self.vae_step(b))

    # The three parts of a step, each one fixed-shape function of the buffers (one CUDA graph each).
    def dit_step(self, b: int, iters: int) -> None:
        """Local DiT: every row's next latent patch (Euler solver with CFG-zero*, the row's own time grid
        and noise), its encoding for the LMs, and the stop flag of its current hidden state."""
        m, cfm = self.m, self.m.feat_decoder
        mu = self.family.dit_condition(self.lm_hidden[:b], self.res_hidden[:b])
        x = self.noise[self.rows_idx[:b], self.step_idx[:b]]  # [b, C, P]
        cond = self.cond[:b].transpose(1, 2).contiguous()
        steps, zero_init, cfg = self.timesteps[:b], self.zero_init[:b], self.cfg[:b].view(b, 1, 1)
        grid = self.t_grid[:b]
        t = grid[:, 0]
        dt = t - grid[:, 1]
        mu_in = torch.cat([mu, torch.zeros_like(mu)])
        cond_in = torch.cat([cond, cond])
        for k in range(iters):
            t_in = torch.cat([t, t])
            dt_in = torch.cat([dt, dt]) if cfm.mean_mode else torch.zeros_like(t_in)
            v = self.estimator(torch.cat([x, x]), mu_in, t_in, cond_in, dt_in)
            v_cond, v_uncond = v[:b], v[b:]
            st_star = cfm.optimized_scale(v_cond.reshape(b, -1), v_uncond.reshape(b, -1)).view(b, 1, 1)
            dphi = v_uncond * st_star + cfg * (v_cond - v_uncond * st_star)
            dphi = torch.where((zero_init >= k + 1).view(b, 1, 1), torch.zeros_like(dphi), dphi)
            moving = steps > k  # rows with fewer steps have finished their solve and hold still
            x = torch.where(moving.view(b, 1, 1), x - dt.view(b, 1, 1) * dphi, x)
            t_next = t - dt
            dt = torch.where(moving & (steps > k + 1), t_next - grid[:, min(k + 2, grid.shape[1] - 1)], dt)
            t = torch.where(moving, t_next, t)
        pred = x.transpose(1, 2)  # [b, P, D]
        self.stop[:b] = m.stop_head(m.stop_actn(m.stop_proj(self.lm_hidden[:b]))).argmax(dim=-1)
        self.curr[:b] = m.enc_to_lm_proj(self.feat_encoder(pred.unsqueeze(1)))[:, 0]
        self.pred[:b] = pred
        self.cond[:b] = pred

    def lm_step(self, b: int, length: int) -> None:
        """Both LMs advance one position per live row (padding rows compute and stay put)."""
        m = self.m
        curr = self.curr[:b]
        lm = m.fsq_layer(self._lm_forward(m.base_lm, self.base_kv, curr, b, length))
        self.res_hidden[:b] = self._lm_forward(m.residual_lm, self.res_kv, self.family.residual_input(lm, curr), b,
                                               length)
        self.lm_hidden[:b] = lm
        self.pos[:b] += self.live[:b]
        self.step_idx[:b] += self.live[:b]

    def vae_step(self, b: int) -> None:
        self.audio[:b] = self.decoder.decode(self.pred[:b].transpose(1, 2)).reshape(b, -1)

    def _lm_forward(self, lm, cache: torch.Tensor, x: torch.Tensor, b: int, length: int) -> torch.Tensor:
        """MiniCPMModel.forward_step with a position per row (the package's takes one for all).

        Attention reads the first `length` KV positions (a bucket above the longest live row), not
        the whole cache: masked positions add nothing but memory traffic.
        """
        pos, rows = self.pos[:b], self.rows_idx[:b]
        cos = sin = None
        if lm.rope_emb is not None:
            cos, sin = lm.rope_emb(pos)
            cos, sin = cos[:, None, None, :], sin[:, None, None, :]
        mask = (torch.arange(length, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
        h = x
        for i, layer in enumerate(lm.layers):
            residual = h
            a = layer.self_attn
            hn = layer.input_layernorm(h)
            q = a.q_proj(hn).view(b, 1, a.num_heads, a.head_dim).transpose(1, 2)
            k = a.k_proj(hn).view(b, 1, a.num_key_value_heads, a.head_dim).transpose(1, 2)
            v = a.v_proj(hn).view(b, 1, a.num_key_value_heads, a.head_dim).transpose(1, 2)
            if cos is not None:
                q, k = _rope(q, k, cos, sin)
            kc, vc = cache[0, i], cache[1, i]
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            attn = torch.nn.functional.scaled_dot_product_attention(
                q.contiguous(), kc[:b, :, :length], vc[:b, :, :length], attn_mask=mask, enable_gqa=True)
            h = a.o_proj(attn.transpose(1, 2).reshape(b, a.num_heads * a.head_dim))
            h = residual + (h * (layer.scale_depth / math.sqrt(layer.num_hidden_layers)) if layer.use_mup else h)
            residual = h
            h = layer.mlp(layer.post_attention_layernorm(h))
            h = residual + (h * (layer.scale_depth / math.sqrt(layer.num_hidden_layers)) if layer.use_mup else h)
        return lm.norm(h)

    # -- start-up --------------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, timesteps: int, max_length_bucket: int = 1024) -> int:
        """Capture the step's graphs for every batch bucket (and attention lengths up to
        max_length_bucket) before serving, so no user waits on a capture; returns graphs captured.
        Runs on the idle batch: padding rows compute and change nothing that a joining row keeps."""
        if self.slots:
            raise RuntimeError("prepare() runs on an idle batch only")
        for b in self.buckets:
            self._dit(b, timesteps)
            for length in self.lengths:
                if length <= max(max_length_bucket, self.lengths[0]):
                    self._lm(b, length)
            self._vae(b)
        self.decoder.reset(self.rows_idx)
        return len(self.graphs.graphs)


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


def pick_max_batch(free_bytes: int, model, cap: int, max_steps: int = 2048) -> int:
    """Rows that fit in `free_bytes`: both LMs' KV caches at full length, a row's noise, and working
    memory (the DiT runs 2 rows per request for CFG; the VAE decode's activations; graph pools)."""
    per_row = 0
    itemsize = next(model.base_lm.parameters()).element_size()
    for lm in (model.base_lm, model.residual_lm):
        c = lm.config
        head_dim = c.kv_channels or c.hidden_size // c.num_attention_heads
        per_row += 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.config.max_length * itemsize
    per_row += max_steps * model.feat_decoder.in_channels * model.patch_size * itemsize
    per_row = int(per_row * 1.5)
    return max(1, min(cap, int(free_bytes * 0.8) // max(per_row, 1)))
