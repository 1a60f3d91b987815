"""VoxCPM's own settings (VOXCPM_*), read once; a model entry in MODELS may override any of them."""
from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class VoxCPMSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VOXCPM_", case_sensitive=False, extra="forbid",
                                      env_ignore_empty=True)

    # Generation defaults (each can be overridden per request within bounds)
    cfg_value: float = Field(2.0, ge=0.5, le=5.0)
    inference_timesteps: int = Field(10, ge=1, le=100)
    max_len: int = Field(2048, ge=16)
    normalize: bool = False
    retry_badcase: bool = True
    # Benchmarks only: every sentence chunk generates exactly this many tokens, stop head ignored
    # (random-weight checkpoints stop at random). 0 = off, the only sensible production value.
    fixed_tokens: int = Field(0, ge=0, le=4096)
    # The batched step on CUDA runs as CUDA graphs captured before ready (one per batch-size bucket);
    # off = eager kernels (for diagnosis: several times slower per step).
    cuda_graphs: bool = True
    # torch.compile (inductor) of the batched step's parts before their capture: fused kernels, fewer
    # of them per step; costs a compile on the first start (cached on the models volume after).
    compile_step: bool = False
