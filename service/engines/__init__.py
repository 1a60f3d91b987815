"""Engine selection: TTS_ENGINE names exactly one; there is no silent fallback between engines."""
from __future__ import annotations

from ..settings import Settings
from .base import Engine, EngineError, EngineInfo, NothingToSay, Preset, SynthesisParams, VoicePrompt

__all__ = ["Engine", "EngineError", "EngineInfo", "NothingToSay", "Preset", "SynthesisParams", "VoicePrompt", "build_engine"]


def build_engine(settings: Settings) -> Engine:
    if settings.tts_engine == "voxcpm":
        from .voxcpm.engine import VoxCPMEngine

        return VoxCPMEngine(
            model_dir=settings.model_dir, device=settings.tts_device, compile_mode=settings.tts_compile,
            cfg_value=settings.voxcpm_cfg_value, inference_timesteps=settings.voxcpm_inference_timesteps,
            max_len=settings.voxcpm_max_len, normalize=settings.voxcpm_normalize,
            retry_badcase=settings.voxcpm_retry_badcase, max_chunk_chars=settings.max_chunk_chars,
            fixed_tokens=settings.voxcpm_fixed_tokens, cuda_graphs=settings.voxcpm_cuda_graphs,
            compile_step=settings.voxcpm_compile_step,
            serial=settings.tts_max_batch.strip() == "1")
    from .embedded import EmbeddedEngine

    return EmbeddedEngine()
