"""The opt-in reduced precision of the image encoder: off by default, close to float32 when on."""
import numpy as np
import pytest
import torch

from micro_sam.models import precision
from micro_sam.models.fast_attention import optimize_sam
from micro_sam.util import get_sam_model, precompute_image_embeddings

from conftest import make_tiny_predictor


def _tiny_predictor_with_rel_pos():
    predictor = make_tiny_predictor(seed=5)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in predictor.model.named_parameters():
            if "rel_pos" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    optimize_sam(predictor.model)
    return predictor


def _relative_error(a, b):
    return float(np.abs(a - b).mean() / np.abs(b).mean())


@pytest.fixture
def image(rng):
    return rng.integers(0, 255, size=(256, 320)).astype("uint8")


def test_default_is_float32(vit_t_checkpoint):
    predictor = get_sam_model(model_type="vit_t", checkpoint_path=vit_t_checkpoint, device="cpu")
    assert predictor._encoder_dtype is None


def test_precision_option_of_get_sam_model(vit_t_checkpoint, tmp_path):
    predictor = get_sam_model(model_type="vit_t", checkpoint_path=vit_t_checkpoint, device="cpu",
                              precision="bfloat16")
    assert predictor._encoder_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float16.*not supported on the CPU"):
        get_sam_model(model_type="vit_t", checkpoint_path=vit_t_checkpoint, device="cpu", precision="float16")
    # A bad precision is reported before the (here missing) checkpoint is looked at.
    with pytest.raises(ValueError, match="Unsupported precision 'fp8'.*bfloat16.*float16.*float32"):
        get_sam_model(model_type="vit_t", checkpoint_path=tmp_path / "missing.pt", device="cpu", precision="fp8")


def test_resolve_precision():
    assert precision.resolve_precision(None, "cpu") == torch.float32
    assert precision.resolve_precision("float32", "cpu") == torch.float32
    assert precision.resolve_precision(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="Unsupported precision"):
        precision.resolve_precision(torch.int8, "cpu")
    with pytest.raises(ValueError, match="Unsupported precision"):
        precision.resolve_precision(16, "cpu")


def test_bfloat16_embeddings_are_close_and_switch_back_is_exact(image):
    predictor = _tiny_predictor_with_rel_pos()
    full = precompute_image_embeddings(predictor, image, verbose=False)["features"]
    assert precision.set_precision(predictor, "bfloat16") is predictor
    reduced = precompute_image_embeddings(predictor, image, verbose=False)["features"]
    assert reduced.dtype == np.float32 and reduced.shape == full.shape
    assert not np.array_equal(reduced, full)
    assert _relative_error(reduced, full) < 0.01
    assert predictor.features.dtype == torch.float32
    precision.set_precision(predictor, "float32")
    assert predictor._encoder_dtype is None
    again = precompute_image_embeddings(predictor, image, verbose=False)["features"]
    np.testing.assert_array_equal(again, full)


def test_forced_autocast_on_cpu(image):
    # The path used on GPUs and on CPUs with native bfloat16: the whole encoder under torch.autocast.
    predictor = _tiny_predictor_with_rel_pos()
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    encoder = predictor.model.image_encoder
    with torch.inference_mode():
        full = encoder(x)
        with precision.encoder_precision(torch.bfloat16, "cpu", autocast=True):
            reduced = encoder(x)
        with precision.encoder_precision(None, "cpu", autocast=True):
            unchanged = encoder(x)
    assert torch.equal(unchanged, full)
    assert not torch.equal(reduced.float(), full)
    assert _relative_error(reduced.float().numpy(), full.numpy()) < 0.02


def test_attention_only_mode_on_cpus_without_native_bfloat16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: False)
    predictor = _tiny_predictor_with_rel_pos()
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), precision.encoder_precision(torch.bfloat16, "cpu"):
        out = predictor.model.image_encoder(x)
    # The linear layers stayed float32 (no autocast), only the attention was reduced.
    assert out.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")
