"""Loading the checkpoint formats safely; refusing checkpoints that would run code."""
import os
import sys
import types

import numpy as np
import pytest
import torch

from micro_sam import _checkpoints
from micro_sam.util import export_custom_sam_model, get_sam_model


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_weights(sam, state):
    own = sam.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items())


def test_plain_state_dict(vit_t_checkpoint):
    predictor, sam = get_sam_model(model_type="vit_t", checkpoint_path=vit_t_checkpoint, return_sam=True)
    assert _same_weights(sam, _state(vit_t_checkpoint))
    assert predictor.model_type == "vit_t" and predictor.model_name == "vit_t"
    assert predictor.checkpoint_path == os.fspath(vit_t_checkpoint)
    assert predictor._hash.startswith("xxh128:") and len(predictor._hash) == len("xxh128:") + 32
    assert not sam.training


class _FakeTrainerClass:
    """Stands for a class of the training code that torch_em pickles into a checkpoint's metadata."""

    def __init__(self, value):
        self.value = value


@pytest.fixture
def trainer_checkpoint(tmp_path, vit_t_checkpoint):
    # Register the class under a torch_em module name, as in real trainer checkpoints.
    module = types.ModuleType("torch_em.fake_trainer_module")
    _FakeTrainerClass.__module__ = module.__name__
    module._FakeTrainerClass = _FakeTrainerClass
    sys.modules[module.__name__] = module
    state = _state(vit_t_checkpoint)
    decoder_state = {"decoder.weight": torch.arange(6.0).reshape(2, 3)}
    checkpoint = {
        "model_state": {f"sam.{k}": v for k, v in state.items()},
        "decoder_state": decoder_state,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5}]},
        "iteration": 12, "best_metric": np.float64(0.25),
        "init": {"model_class": "micro_sam.training.trainable_sam.TrainableSAM", "extra": _FakeTrainerClass(3)},
    }
    path = tmp_path / "trainer.pt"
    torch.save(checkpoint, path)
    del sys.modules[module.__name__]  # the class is not importable when the checkpoint is loaded
    return path, state, decoder_state


def test_trainer_checkpoint(trainer_checkpoint):
    path, state, decoder_state = trainer_checkpoint
    predictor, sam, loaded = get_sam_model(model_type="vit_t", checkpoint_path=path, return_sam=True,
                                           return_state=True)
    assert _same_weights(sam, state)
    assert loaded["iteration"] == 12
    assert torch.equal(loaded["decoder_state"]["decoder.weight"], decoder_state["decoder.weight"])


def test_export_and_reload(trainer_checkpoint, tmp_path):
    path, state, decoder_state = trainer_checkpoint
    exported = tmp_path / "exported.pt"
    export_custom_sam_model(path, "vit_t", exported, with_segmentation_decoder=True)
    content = _state(exported)
    assert set(content) == {"model_state", "decoder_state"}
    assert not any(k.startswith("sam.") for k in content["model_state"])
    _, sam, loaded = get_sam_model(model_type="vit_t", checkpoint_path=exported, return_sam=True, return_state=True)
    assert _same_weights(sam, state)
    assert torch.equal(loaded["decoder_state"]["decoder.weight"], decoder_state["decoder.weight"])
    # without the decoder: a plain state dict
    plain = tmp_path / "plain.pt"
    export_custom_sam_model(path, "vit_t", plain)
    assert "image_encoder.neck.0.weight" in _state(plain)


def test_architecture_mismatch_warns_and_uses_weights(vit_t_checkpoint):
    with pytest.warns(UserWarning, match="vit_t"):
        predictor = get_sam_model(model_type="vit_b", checkpoint_path=vit_t_checkpoint)
    assert predictor.model_type == "vit_t"


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, vit_t_checkpoint):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model_state": _state(vit_t_checkpoint), "payload": _Exploit(marker)}, path)
    with pytest.raises(RuntimeError, match="Refusing to load"):
        get_sam_model(model_type="vit_t", checkpoint_path=path)
    assert not marker.exists()


def test_missing_and_truncated_checkpoints(tmp_path, vit_t_checkpoint):
    with pytest.raises(ValueError, match="does not exist"):
        get_sam_model(model_type="vit_t", checkpoint_path=tmp_path / "nope.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(vit_t_checkpoint.read_bytes()[: 1 << 20])
    with pytest.raises(RuntimeError, match="truncated"):
        get_sam_model(model_type="vit_t", checkpoint_path=truncated)
    not_sam = tmp_path / "not_sam.pt"
    torch.save({"weight": torch.zeros(2)}, not_sam)
    with pytest.raises(RuntimeError, match="no SAM weights"):
        get_sam_model(model_type="vit_t", checkpoint_path=not_sam)


def test_unknown_model_and_device():
    with pytest.raises(ValueError, match="Invalid model_type"):
        get_sam_model(model_type="resnet50")
    with pytest.raises(ValueError, match="Unknown model_type 'vit_b_unknown'"):
        get_sam_model(model_type="vit_b_unknown")
    from micro_sam.util import get_device

    assert get_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available"):
            get_device("cuda")
        assert get_device() in ("cpu", "mps")
    with pytest.raises(RuntimeError, match="Unsupported device"):
        get_device("tpu")


def test_infer_architecture_from_shapes():
    for dim, arch in [(768, "vit_b"), (1024, "vit_l"), (1280, "vit_h")]:
        state = {"image_encoder.patch_embed.proj.weight": torch.zeros(dim, 3, 16, 16)}
        assert _checkpoints.infer_architecture(state) == arch
    assert _checkpoints.infer_architecture({"image_encoder.layers.0.blocks.0.x": torch.zeros(1)}) == "vit_t"
