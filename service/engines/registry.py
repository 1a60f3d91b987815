"""Model families and how to build their engines: the one place that knows which engines exist.

A family is found from what a model entry names (`engine`) or, for a checkpoint, from its
config.json `architecture`. A checkpoint whose family cannot be told is refused with what to do,
never loaded as some default family.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from .base import Engine
from .voxcpm.settings import VoxCPMSettings

if TYPE_CHECKING:
    from ..models import ModelSpec
    from ..settings import Settings


class ModelConfigError(ValueError):
    """A model entry or checkpoint the worker cannot serve; the message says what to change."""


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    default_model_name: str
    architectures: tuple[str, ...] = ()  # config.json "architecture" values of its checkpoints
    needs_checkpoint: bool = True
    build: Callable[["ModelSpec", "Settings"], Engine] = field(default=None, repr=False)
    # What its entries' "settings" may hold (a pydantic settings class; env prefix included), checked at
    # start even before the model loads. None: the family takes no settings.
    settings_model: Optional[type] = field(default=None, repr=False)


def _build_voxcpm(spec: "ModelSpec", settings: "Settings") -> Engine:
    from .voxcpm.engine import VoxCPMEngine

    return _voxcpm_engine(VoxCPMEngine, spec, settings)


def _build_voxcpm2(spec: "ModelSpec", settings: "Settings") -> Engine:
    from .voxcpm.voxcpm2 import VoxCPM2Engine

    return _voxcpm_engine(VoxCPM2Engine, spec, settings)


def _voxcpm_engine(cls, spec: "ModelSpec", settings: "Settings") -> Engine:
    """Both VoxCPM families take the same settings (VOXCPM_*, or the entry's "settings")."""
    vs = VoxCPMSettings(**spec.settings)
    return cls(
        model_dir=spec.dir, device=spec.device or settings.tts_device, compile_mode=settings.tts_compile,
        cfg_value=vs.cfg_value, inference_timesteps=vs.inference_timesteps, max_len=vs.max_len,
        normalize=vs.normalize, retry_badcase=vs.retry_badcase, max_chunk_chars=settings.max_chunk_chars,
        fixed_tokens=vs.fixed_tokens, cuda_graphs=vs.cuda_graphs, compile_step=vs.compile_step,
        serial=spec.max_batch(settings).strip() == "1", memory_share=spec.memory_fraction)


def _build_embedded(spec: "ModelSpec", settings: "Settings") -> Engine:
    from .embedded import EmbeddedEngine

    if spec.settings:
        raise ModelConfigError(f"model '{spec.name}': the embedded engine has no settings "
                               f"({', '.join(spec.settings)}); remove them")
    return EmbeddedEngine()


FAMILIES: dict[str, Family] = {
    "voxcpm": Family("voxcpm", "VoxCPM-0.5B / VoxCPM-1.5 (the voxcpm package)", "voxcpm-1.5", ("voxcpm",),
                     build=_build_voxcpm, settings_model=VoxCPMSettings),
    "voxcpm2": Family("voxcpm2", "VoxCPM2: 48 kHz, 30 languages, voice design (the voxcpm package)", "voxcpm2",
                      ("voxcpm2",), build=_build_voxcpm2, settings_model=VoxCPMSettings),
    "embedded": Family("embedded", "Piper en_US-joe-medium, offline (no checkpoint)", "embedded",
                       needs_checkpoint=False, build=_build_embedded),
}


def checkpoint_architecture(model_dir: Path) -> Optional[str]:
    """config.json's `architecture`, or None when the file is not there yet (the engine says so at load)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    try:
        arch = json.loads(config.read_text(encoding="utf-8")).get("architecture")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelConfigError(f"{config} is not a readable JSON object ({e}); check the checkpoint") from None
    known = ", ".join(a for f in FAMILIES.values() for a in f.architectures)
    if not isinstance(arch, str) or not arch.strip():
        raise ModelConfigError(f"{config} does not say which model it is (no \"architecture\"); add "
                               f"\"architecture\": one of {known} (VoxCPM-0.5B and VoxCPM-1.5 are \"voxcpm\")")
    return arch.strip().lower()


def family_for(spec: "ModelSpec") -> Family:
    """The family that serves a model entry, checked against its checkpoint's own architecture."""
    if spec.engine is not None and spec.engine not in FAMILIES:
        raise ModelConfigError(f"model '{spec.name}': unknown engine '{spec.engine}'; use one of "
                               f"{', '.join(FAMILIES)}")
    arch = checkpoint_architecture(spec.dir) if spec.dir is not None else None
    by_arch = next((f for f in FAMILIES.values() if arch in f.architectures), None) if arch else None
    if arch and by_arch is None:
        served = ", ".join(f"{a} ({f.description})" for f in FAMILIES.values() for a in f.architectures)
        raise ModelConfigError(f"model '{spec.name}': the checkpoint at {spec.dir} is a '{arch}' model, which "
                               f"this worker cannot serve; served architectures: {served}")
    family = FAMILIES[spec.engine] if spec.engine else by_arch
    if family is None:
        raise ModelConfigError(f"model '{spec.name}': cannot tell its engine; give \"engine\" "
                               f"({', '.join(FAMILIES)}) or a checkpoint directory with a config.json")
    if by_arch is not None and by_arch is not family:
        raise ModelConfigError(f"model '{spec.name}': engine '{family.name}' cannot load the '{arch}' checkpoint "
                               f"at {spec.dir}; use engine '{by_arch.name}'")
    if family.needs_checkpoint and spec.dir is None:
        raise ModelConfigError(f"model '{spec.name}': the {family.name} engine needs a checkpoint directory "
                               "(MODEL_DIR, or \"dir\"/\"uri\" in MODELS); set MODEL_URI so bootstrap pulls one")
    return family
