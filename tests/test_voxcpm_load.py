"""service/engines/voxcpm/load.py: weights read onto the device give the model `from_local` gives."""
import pytest
import torch

from service.engines.base import EngineError
from service.engines.voxcpm.load import load_voxcpm

from .support.voxcpm_checkpoint import build_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("load") / "tiny", size="tiny", seed=9)


def test_every_tensor_equals_the_packages_loader(checkpoint):
    from voxcpm.model.voxcpm import VoxCPMModel

    ours = load_voxcpm(checkpoint, "cpu", optimize=False)
    theirs = VoxCPMModel.from_local(str(checkpoint), optimize=False, device="cpu")
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].device == b[name].device, name
        assert torch.equal(a[name], b[name]), name
    for (name, x), (_, y) in zip(ours.named_buffers(), theirs.named_buffers()):
        assert torch.equal(x, y), name
    assert not ours.training
    # bf16 LMs and a float32 VAE, as the package keeps them
    assert next(ours.base_lm.parameters()).dtype == torch.bfloat16
    assert next(ours.audio_vae.parameters()).dtype == torch.float32


def test_a_checkpoint_missing_weights_is_refused_by_name(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoint.iterdir():
        (broken / f.name).symlink_to(f)
    state = load_file(str(checkpoint / "model.safetensors"))
    state.pop("stop_head.weight")
    (broken / "model.safetensors").unlink()
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(EngineError, match="lacks 1 weight.*stop_head.weight"):
        load_voxcpm(broken, "cpu", optimize=False)
    (broken / "model.safetensors").unlink()
    with pytest.raises(EngineError, match="no weights .*model.safetensors"):
        load_voxcpm(broken, "cpu", optimize=False)
