"""Streaming AudioVAE decode for VoxCPM-1.5 and VoxCPM2: each generation step decodes only the patch it adds.

The package decodes the last three patches for every streamed chunk and keeps the newest third: three
times the decoder work of what is new, and still an approximation of decoding the whole sequence (the
decoder sees no further back than two patches). Every layer of the AudioVAE decoder is causal (left
padded convolutions, transposed convolutions trimmed on the right, point-wise Snake/Tanh), so carrying
each convolution's last inputs from one call to the next gives exactly the samples a decode of the
whole latent sequence gives, for one patch of work per step. VoxCPM2's AudioVAE V2 has the same layers
(its own classes) plus a per-channel scale and bias ahead of each upsampling block, chosen by the output
rate: a constant for a model, folded in here like the weights.

The decoder is rebuilt as a flat program of operations on materialised weights (weight norm folded in
once), with per-row state in preallocated tensors: fixed shapes, no host synchronisation, so a step can
be captured in a CUDA graph. Rows are addressed as a prefix [:b] of the state, like the rest of the
batch (service/engines/voxcpm/batch.py).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedDecoder(ValueError):
    """The AudioVAE decoder has a layer this streaming decoder cannot carry state for."""


@dataclass
class _Conv:
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    dilation: int
    groups: int
    context: int  # inputs carried to the next call: (kernel - 1) * dilation, the causal left padding
    state: int = -1  # index into the state list, -1 when context is 0


@dataclass
class _TransposedConv:
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    stride: int
    groups: int
    state: int = -1


@dataclass
class _Snake:
    alpha: torch.Tensor


@dataclass
class _Residual:
    ops: list


class _Tanh:
    pass


@dataclass
class _Affine:
    """x * scale + bias per channel (AudioVAE V2's sample-rate condition, scale_bias or add)."""
    scale: torch.Tensor  # [1, C, 1]
    bias: torch.Tensor


@dataclass
class _Concat:
    """Constant channels appended (AudioVAE V2's sample-rate condition of cond_type concat)."""
    channels: torch.Tensor  # [1, C', 1]


def _weight(conv: nn.Module) -> torch.Tensor:
    """The effective weight: folds the package's (old-style) weight norm, or parametrized weight norm."""
    if hasattr(conv, "weight_g") and hasattr(conv, "weight_v"):
        return torch._weight_norm(conv.weight_v, conv.weight_g, 0).detach()
    return conv.weight.detach()


class StreamingDecoder:
    """Per-row causal decoding state for `max_rows` rows of one AudioVAE decoder."""

    def __init__(self, audio_vae: nn.Module, max_rows: int, device, dtype=torch.float32):
        # The layer classes of the VAE's own module: AudioVAE (1.5) and AudioVAE V2 each define theirs.
        layers = sys.modules[type(audio_vae).__module__]
        CausalConv1d, CausalDecoderBlock, CausalResidualUnit, CausalTransposeConv1d, Snake1d = (
            layers.CausalConv1d, layers.CausalDecoderBlock, layers.CausalResidualUnit, layers.CausalTransposeConv1d,
            layers.Snake1d)

        self.dtype = dtype
        self.state_shapes: list[tuple[int, int]] = []  # (channels, length) per carried input

        def build(module: nn.Module) -> list:
            ops = []
            for child in module:
                if isinstance(child, CausalResidualUnit):
                    ops.append(_Residual(build(child.block)))
                elif isinstance(child, CausalTransposeConv1d):
                    if child.kernel_size[0] != 2 * child.stride[0] or child.padding[0] != 0 \
                            or child.dilation[0] != 1:
                        raise UnsupportedDecoder(f"transposed convolution {child} is not kernel = 2 x stride")
                    op = _TransposedConv(_weight(child).to(dtype), _bias(child, dtype), child.stride[0],
                                         child.groups, len(self.state_shapes))
                    self.state_shapes.append((child.in_channels, 1))
                    ops.append(op)
                elif isinstance(child, CausalConv1d):
                    if child.stride[0] != 1 or child.padding[0] != 0:
                        raise UnsupportedDecoder(f"strided or padded convolution {child} in the decoder")
                    context = (child.kernel_size[0] - 1) * child.dilation[0]
                    op = _Conv(_weight(child).to(dtype), _bias(child, dtype), child.dilation[0], child.groups,
                               context)
                    if context:
                        op.state = len(self.state_shapes)
                        self.state_shapes.append((child.in_channels, context))
                    ops.append(op)
                elif isinstance(child, Snake1d):
                    ops.append(_Snake(child.alpha.detach().to(dtype)))
                elif isinstance(child, nn.Tanh):
                    ops.append(_Tanh())
                elif isinstance(child, CausalDecoderBlock):
                    ops.extend(build(child.block))
                elif isinstance(child, nn.Sequential):
                    ops.extend(build(child))
                elif isinstance(child, nn.Identity):
                    pass
                else:
                    raise UnsupportedDecoder(f"no streaming form for decoder layer {type(child).__name__}")
            return ops

        def sample_rate_condition(layer: nn.Module, sr_idx: torch.Tensor) -> list:
            if layer.cond_type in ("scale_bias", "scale_bias_init"):
                ops = [_Affine(_embed(layer.scale_embed, sr_idx, dtype), _embed(layer.bias_embed, sr_idx, dtype))]
            elif layer.cond_type == "add":
                cond = _embed(layer.cond_embed, sr_idx, dtype)
                ops = [_Affine(torch.ones_like(cond), cond)]
            elif layer.cond_type == "concat":
                ops = [_Concat(_embed(layer.cond_embed, sr_idx, dtype))]
            else:
                raise UnsupportedDecoder(f"no streaming form for sample-rate condition {layer.cond_type!r}")
            return ops + build(layer.out_layer if isinstance(layer.out_layer, nn.Sequential) else [layer.out_layer])

        decoder = audio_vae.decoder
        if getattr(decoder, "sr_bin_boundaries", None) is None:
            self.ops = build(decoder.model)
        else:  # AudioVAE V2 decodes at its out_sample_rate (what its decode does when given no rate)
            sr_idx = decoder.get_sr_idx(torch.tensor([audio_vae.out_sample_rate], dtype=torch.int32,
                                                     device=decoder.sr_bin_boundaries.device))
            self.ops = []
            for layer, condition in zip(decoder.model, decoder.sr_cond_model):
                if condition is not None:
                    self.ops += sample_rate_condition(condition, sr_idx)
                self.ops += build([layer])
        self.states = [torch.zeros(max_rows, c, n, device=device, dtype=dtype) for c, n in self.state_shapes]

    # -- state management (between steps, outside any graph) -------------------------------------
    def reset(self, rows: torch.Tensor) -> None:
        """Rows start from silence: the zero left padding a whole-sequence decode starts with."""
        for s in self.states:
            s.index_fill_(0, rows, 0.0)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for s in self.states:
            s.index_copy_(0, dst, s.index_select(0, src))

    def prime(self, row: int, latent: torch.Tensor) -> None:
        """Feed a row context it must not output (a voice prompt's last patches): latent [D, T]."""
        self.decode(latent.unsqueeze(0).to(self.dtype), rows=slice(row, row + 1))

    # -- the decode ------------------------------------------------------------------------------
    def decode(self, latent: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """latent [b, D, T] for state rows `rows` (default: the prefix [:b]) -> audio [b, 1, T * hop].

        Updates those rows' state in place; fixed shapes throughout (capturable).
        """
        rows = rows if rows is not None else slice(0, latent.shape[0])
        states = [s[rows] for s in self.states]
        return _run(self.ops, latent.to(self.dtype), states)


def _embed(embedding: nn.Embedding, idx: torch.Tensor, dtype) -> torch.Tensor:
    return embedding(idx).detach().to(dtype).view(1, -1, 1)


def _bias(module: nn.Module, dtype) -> Optional[torch.Tensor]:
    return None if module.bias is None else module.bias.detach().to(dtype)


def _run(ops: list, x: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
    for op in ops:
        if isinstance(op, _Snake):
            # The package's snake(), written out (its TorchScript function cannot be traced by dynamo).
            x = x + (op.alpha + 1e-9).reciprocal() * torch.sin(op.alpha * x).pow(2)
        elif isinstance(op, _Conv):
            if op.context:
                state = states[op.state]
                full = torch.cat([state, x], dim=-1)
                state.copy_(full[..., -op.context:])
                x = full
            x = F.conv1d(x, op.weight, op.bias, dilation=op.dilation, groups=op.groups)
        elif isinstance(op, _TransposedConv):
            # Output n depends on inputs n // stride and the one before (kernel = 2 x stride), so one
            # carried input gives the exact samples; the first `stride` outputs belong to that input.
            state = states[op.state]
            full = torch.cat([state, x], dim=-1)
            state.copy_(full[..., -1:])
            y = F.conv_transpose1d(full, op.weight, op.bias, stride=op.stride, groups=op.groups)
            x = y[..., op.stride:op.stride * full.shape[-1]]
        elif isinstance(op, _Residual):
            x = x + _run(op.ops, x, states)
        elif isinstance(op, _Affine):
            x = x * op.scale + op.bias
        elif isinstance(op, _Concat):
            x = torch.cat([x, op.channels.expand(x.shape[0], -1, x.shape[-1])], dim=1)
        else:
            x = torch.tanh(x)
    return x
