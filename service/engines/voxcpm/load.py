"""Load a VoxCPM-1.5 or VoxCPM2 checkpoint with its weights read straight onto the device.

The package's `VoxCPMModel.from_local` builds the model on the CPU (random initialisation of every
parameter there), reads the weights into CPU memory, loads them, then copies the whole model to the
GPU, and never says when a tensor the model needs is absent (`strict=False`). Here the modules are
created on the device, safetensors reads each tensor directly onto it, and a checkpoint that leaves
any model weight unset is refused by name. Same modules, same dtypes, same values as `from_local`
(tests/test_voxcpm_load.py compares every tensor). The model class follows config.json's
`architecture`, as in the package's own `VoxCPM` (voxcpm: VoxCPMModel + AudioVAE; voxcpm2: VoxCPM2Model +
AudioVAE V2).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..base import EngineError

log = logging.getLogger(__name__)


def model_classes(architecture: str):
    """(config class, model class, AudioVAE class) of the package for a checkpoint's architecture."""
    if architecture == "voxcpm2":
        from voxcpm.model.voxcpm2 import VoxCPM2Model, VoxCPMConfig
        from voxcpm.modules.audiovae import AudioVAEV2

        return VoxCPMConfig, VoxCPM2Model, AudioVAEV2
    from voxcpm.model.voxcpm import VoxCPMConfig, VoxCPMModel
    from voxcpm.modules.audiovae import AudioVAE

    return VoxCPMConfig, VoxCPMModel, AudioVAE


def load_voxcpm(model_dir: Path, device: str, optimize: bool, architecture: str = "voxcpm"):
    import torch
    from transformers import LlamaTokenizerFast
    from voxcpm.model.utils import get_dtype

    VoxCPMConfig, VoxCPMModel, AudioVAE = model_classes(architecture)
    path = Path(model_dir)
    config = VoxCPMConfig.model_validate_json((path / "config.json").read_text(encoding="utf-8"))
    tokenizer = LlamaTokenizerFast.from_pretrained(str(path))
    with torch.device(device):  # parameters are created on the device: no CPU copy to move afterwards
        audio_vae = AudioVAE(config=config.audio_vae_config) if config.audio_vae_config else AudioVAE()
        model = VoxCPMModel(config, tokenizer, audio_vae, None, device=device)
    model = model.to(get_dtype(model.config.dtype))
    model.audio_vae = model.audio_vae.to(torch.float32)

    state = _read(path, ("model.safetensors", "pytorch_model.bin"), device)
    vae = _read(path, ("audiovae.safetensors", "audiovae.pth"), device)
    state.update({f"audio_vae.{k}": v for k, v in vae.items()})
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if "lora_" not in k]
    if missing:
        raise EngineError(f"the checkpoint at {path} lacks {len(missing)} weight(s) the model needs "
                          f"(e.g. {', '.join(missing[:3])}); it is incomplete or for another architecture")
    if result.unexpected_keys:
        log.warning("voxcpm: %d tensor(s) in the checkpoint are not used by the model (e.g. %s)",
                    len(result.unexpected_keys), ", ".join(result.unexpected_keys[:3]))
    del state
    return model.eval().optimize(disable=not optimize)


def _read(path: Path, names: tuple[str, str], device: str) -> dict:
    """The first of `names` present, read onto the device (safetensors first, as the package does)."""
    import torch
    from safetensors.torch import load_file

    for name in names:
        file = path / name
        if not file.is_file():
            continue
        if file.suffix == ".safetensors":
            return load_file(str(file), device=device)
        state = torch.load(str(file), map_location=device, weights_only=True)
        return state.get("state_dict", state)
    raise EngineError(f"no weights in {path} (looked for {' and '.join(names)}); "
                      "check MODEL_DIR or the bootstrap pull")
