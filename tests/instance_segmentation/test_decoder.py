import numpy as np
import pytest
import torch

from micro_sam.instance_segmentation import DecoderAdapter, get_decoder, get_predictor_and_decoder, get_unetr


def _decoder_state(unetr):
    return {k: v.clone() for k, v in unetr.state_dict().items() if not k.startswith("encoder.")}


@pytest.fixture(scope="module")
def tiny_sam():
    from ._models import make_small_sam
    return make_small_sam(0, img_size=256)


def test_decoder_state_names_match_unetr(tiny_sam):
    torch.manual_seed(0)
    unetr = get_unetr(tiny_sam.image_encoder, device="cpu")
    state = _decoder_state(unetr)
    # The published decoder files hold exactly these parameters (torch_em's names, no skip connections).
    assert "deconv1.block.0.conv.weight" in state and "out_conv.weight" in state
    assert tuple(state["out_conv.weight"].shape) == (3, 64, 1, 1)
    assert tuple(state["deconv1.block.0.conv.weight"].shape) == (512, 256, 1, 1)
    adapter = get_decoder(tiny_sam.image_encoder, state, "cpu")
    assert set(adapter.state_dict()) == set(state)
    for key, value in adapter.state_dict().items():
        assert torch.equal(value, state[key])


def test_adapter_on_embeddings_equals_unetr_on_image(tiny_sam):
    from segment_anything import SamPredictor

    torch.manual_seed(1)
    unetr = get_unetr(tiny_sam.image_encoder, device="cpu")
    adapter = get_decoder(tiny_sam.image_encoder, _decoder_state(unetr), "cpu")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)  # no resizing: same encoder input

    predictor = SamPredictor(tiny_sam)
    predictor.set_image(image)
    with torch.no_grad():
        from_embeddings = adapter(predictor.features, predictor.input_size, predictor.original_size)
        full = unetr(torch.from_numpy(image).permute(2, 0, 1)[None].float())  # train mode: batch statistics
    assert from_embeddings.shape == (1, 3, 256, 256)
    torch.testing.assert_close(from_embeddings, full, atol=1e-4, rtol=1e-4)


def test_adapter_keeps_running_statistics(tiny_sam):
    adapter = get_decoder(tiny_sam.image_encoder, _decoder_state(get_unetr(tiny_sam.image_encoder, device="cpu")),
                          "cpu")
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    with torch.no_grad():
        out = adapter(torch.randn(1, 256, 16, 16), (256, 128), (200, 100))
    assert out.shape == (1, 3, 200, 100)
    assert float(out.min()) >= 0 and float(out.max()) <= 1  # sigmoid
    for key, value in adapter.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="embeddings of shape"):
        adapter(torch.randn(1, 64, 64, 64), (1024, 1024), (10, 10))


def test_mismatched_decoder_state(tiny_sam):
    state = _decoder_state(get_unetr(tiny_sam.image_encoder, device="cpu"))
    bad = dict(state)
    bad["base.block.1.weight"] = torch.zeros(512, 128, 3, 3)
    with pytest.raises(RuntimeError, match="base.block.1.weight"):
        get_decoder(tiny_sam.image_encoder, bad, "cpu")
    missing = {k: v for k, v in state.items() if not k.startswith("out_conv")}
    with pytest.raises(RuntimeError, match="out_conv"):
        get_unetr(tiny_sam.image_encoder, missing, device="cpu")
    with pytest.warns(UserWarning, match="out_conv"):
        unetr = get_unetr(tiny_sam.image_encoder, missing, device="cpu", flexible_load_checkpoint=True)
    assert torch.equal(unetr.state_dict()["base.block.1.weight"], state["base.block.1.weight"])


def test_get_predictor_and_decoder(tmp_path, tiny_sam):
    from micro_sam.models.build_sam import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"]()
    decoder_state = _decoder_state(get_unetr(sam.image_encoder, device="cpu"))
    path = tmp_path / "vit_t_with_decoder.pt"
    torch.save({"model_state": sam.state_dict(), "decoder_state": decoder_state}, path)
    predictor, decoder = get_predictor_and_decoder("vit_t", path, device="cpu")
    assert isinstance(decoder, DecoderAdapter)
    for key, value in decoder.state_dict().items():
        assert torch.equal(value, decoder_state[key])

    plain = tmp_path / "vit_t_plain.pt"
    torch.save(sam.state_dict(), plain)
    with pytest.raises(ValueError, match="no instance segmentation decoder"):
        get_predictor_and_decoder("vit_t", plain, device="cpu")
