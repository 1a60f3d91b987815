"""Engines: one model on one device each. Which families exist and how each is built: registry.py."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (CloneMode, Continuation, Engine, EngineError, EngineInfo, NothingToSay, Preset, SynthesisParams,
                   UnsupportedRequest, VoicePrompt)

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["CloneMode", "Continuation", "Engine", "EngineError", "EngineInfo", "NothingToSay", "Preset",
           "SynthesisParams", "UnsupportedRequest", "VoicePrompt", "build_engine"]


def build_engine(settings: "Settings") -> Engine:
    """The default model's engine, built like the worker builds it (benchmarks, tools)."""
    from .registry import family_for

    spec = next(s for s in settings.model_specs if s.default)
    return family_for(spec).build(spec, settings)
