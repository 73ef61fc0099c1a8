import os

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.build_sam import build_sam_vit_b as sa_build_sam_vit_b
from segment_anything.modeling import ImageEncoderViT, Sam

from micro_sam.models import TinyViT, build_sam_vit_t, sam_model_registry

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")


@pytest.fixture(scope="module")
def vit_t():
    return sam_model_registry["vit_t"]()


def test_registry_names():
    assert {"vit_h", "vit_l", "vit_b", "vit_t"} <= set(sam_model_registry)
    assert sam_model_registry["vit_t"] is build_sam_vit_t


def test_vit_t_state_dict_matches_mobile_sam_manifest(vit_t):
    # tiny_vit_keys.tsv lists MobileSAM's vit_t state dict (scripts/make_tiny_vit_fixture.py).
    with open(os.path.join(DATA, "tiny_vit_keys.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    state = vit_t.state_dict()
    assert list(state) == [key for key, _, _ in rows]
    for key, dtype, shape in rows:
        assert str(state[key].dtype) == f"torch.{dtype}", key
        assert tuple(state[key].shape) == tuple(int(s) for s in shape.split(",") if s), key


def test_vit_t_model_structure(vit_t):
    assert isinstance(vit_t, Sam)
    assert isinstance(vit_t.image_encoder, TinyViT)
    assert vit_t.image_encoder.img_size == 1024
    assert vit_t.prompt_encoder.image_embedding_size == (64, 64)
    assert vit_t.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])
    assert vit_t.pixel_std.flatten().tolist() == pytest.approx([58.395, 57.12, 57.375])


def test_vit_t_checkpoint_round_trip(vit_t, tmp_path):
    state = vit_t.state_dict()  # random initialization, different from the next build's
    path = tmp_path / "vit_t.pt"
    torch.save(state, path)
    loaded = build_sam_vit_t(checkpoint=str(path)).state_dict()
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_vit_b_builder_matches_segment_anything():
    sam = sam_model_registry["vit_b"]()
    assert isinstance(sam.image_encoder, ImageEncoderViT)
    expected = sa_build_sam_vit_b(None).state_dict()
    state = sam.state_dict()
    assert list(state) == list(expected)
    assert all(state[k].shape == expected[k].shape for k in expected)


def test_vit_t_works_with_segment_anything_predictor():
    model = sam_model_registry["vit_t"]().eval()
    predictor = SamPredictor(model)
    image = np.zeros((96, 128, 3), dtype=np.uint8)
    image[20:60, 30:90] = 200
    predictor.set_image(image)
    assert predictor.features.shape == (1, 256, 64, 64)
    masks, scores, low_res = predictor.predict(point_coords=np.array([[60, 40]]), point_labels=np.array([1]))
    assert masks.shape == (3, 96, 128) and masks.dtype == bool
    assert scores.shape == (3,) and low_res.shape == (3, 256, 256)
