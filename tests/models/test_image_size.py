"""vit_t models built for another encoder input size than 1024 (the bundled demo model runs at 512)."""
import numpy as np
import pytest
import torch

from micro_sam.models.build_sam import build_sam_vit_t, sam_model_registry


@pytest.fixture(scope="module")
def sam_512():
    torch.manual_seed(3)
    return build_sam_vit_t(image_size=512).eval()


@pytest.fixture(scope="module")
def checkpoint_512(sam_512, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt512") / "vit_t_512.pt"
    torch.save({"model_state": sam_512.state_dict(), "image_size": 512}, path)
    return path


def _image(shape=(512, 512), seed=0):
    from micro_sam.sample_data import synthetic_nuclei_2d

    return synthetic_nuclei_2d(shape, seed=seed)


def test_same_parameters_as_1024(sam_512):
    reference = sam_model_registry["vit_t"]().state_dict()
    own = sam_512.state_dict()
    assert list(own) == list(reference)
    assert all(own[k].shape == reference[k].shape for k in own)
    with torch.no_grad():
        out = sam_512.image_encoder(torch.zeros(1, 3, 512, 512))
    assert tuple(out.shape) == (1, 256, 32, 32)
    assert tuple(sam_512.prompt_encoder.image_embedding_size) == (32, 32)
    assert tuple(sam_512.prompt_encoder.mask_input_size) == (128, 128)


@pytest.mark.parametrize("size", [0, 100, 1000, 128, 512.5, True])
def test_invalid_image_size(size):
    with pytest.raises(ValueError, match="image_size"):
        build_sam_vit_t(image_size=size)


def test_get_sam_model_builds_the_recorded_size(sam_512, checkpoint_512):
    """The loaded predictor equals segment_anything's own predictor on the same model."""
    from segment_anything import SamPredictor

    from micro_sam.util import get_sam_model

    predictor = get_sam_model(model_type="vit_t", checkpoint_path=checkpoint_512, device="cpu")
    assert predictor.model.image_encoder.img_size == 512
    image, labels = _image()
    rgb = np.stack([image] * 3, axis=-1)
    predictor.set_image(rgb)
    reference = SamPredictor(sam_512)
    reference.set_image(rgb)
    assert tuple(predictor.features.shape) == (1, 256, 32, 32)
    np.testing.assert_allclose(predictor.features.numpy(), reference.features.numpy(), atol=1e-4)
    point = np.array([[200, 300]])
    masks, scores, logits = predictor.predict(point, np.array([1]), multimask_output=True)
    ref_masks, ref_scores, _ = reference.predict(point, np.array([1]), multimask_output=True)
    assert masks.shape == (3, 512, 512) and logits.shape == (3, 128, 128)
    assert (masks != ref_masks).mean() < 1e-3
    np.testing.assert_allclose(scores, ref_scores, atol=1e-3)


def test_embedding_cache_and_prompt_segmentation(checkpoint_512, tmp_path):
    from micro_sam.prompt_based_segmentation import segment_from_mask, segment_from_points
    from micro_sam.util import get_sam_model, precompute_image_embeddings

    predictor = get_sam_model(model_type="vit_t", checkpoint_path=checkpoint_512, device="cpu")
    image, labels = _image(seed=1)
    path = tmp_path / "emb.zarr"
    first = precompute_image_embeddings(predictor, image, save_path=str(path), verbose=False)
    again = precompute_image_embeddings(predictor, image, save_path=str(path), verbose=False)
    assert tuple(first["features"].shape) == (1, 256, 32, 32)
    np.testing.assert_array_equal(np.asarray(first["features"]), np.asarray(again["features"]))
    mask = segment_from_points(predictor, np.array([[100, 100]]), np.array([1]), image_embeddings=first)
    assert mask.shape == (1, 512, 512)
    # a mask prompt is resized to the 128 x 128 mask input of this model
    mask = segment_from_mask(predictor, labels == labels.max(), image_embeddings=first)
    assert mask.shape[-2:] == (512, 512)


def test_volume_and_tiled_embeddings(checkpoint_512, tmp_path):
    from micro_sam.sample_data import synthetic_nuclei_3d
    from micro_sam.util import get_sam_model, precompute_image_embeddings

    predictor = get_sam_model(model_type="vit_t", checkpoint_path=checkpoint_512, device="cpu")
    volume, _ = synthetic_nuclei_3d((3, 128, 128), seed=0)
    path = tmp_path / "volume.zarr"
    computed = precompute_image_embeddings(predictor, volume, save_path=str(path), ndim=3, verbose=False)
    loaded = precompute_image_embeddings(predictor, volume, save_path=str(path), ndim=3, verbose=False)
    assert tuple(computed["features"].shape) == (3, 1, 256, 32, 32)
    np.testing.assert_array_equal(np.asarray(computed["features"]), np.asarray(loaded["features"]))
    single = precompute_image_embeddings(predictor, volume[1], verbose=False)
    np.testing.assert_allclose(np.asarray(computed["features"][1]), np.asarray(single["features"]), atol=1e-5)

    image, _ = _image((600, 700), seed=4)
    tiled = precompute_image_embeddings(predictor, image, save_path=str(tmp_path / "tiled.zarr"),
                                        tile_shape=(384, 384), halo=(64, 64), verbose=False)
    assert all(tuple(tiled["features"][name].shape) == (1, 256, 32, 32) for name in tiled["features"])


def test_export_keeps_the_size(checkpoint_512, tmp_path):
    from micro_sam.util import export_custom_sam_model, get_sam_model

    out = tmp_path / "exported.pt"
    export_custom_sam_model(checkpoint_512, "vit_t", out)
    assert torch.load(out, weights_only=True)["image_size"] == 512
    assert get_sam_model(model_type="vit_t", checkpoint_path=out, device="cpu").model.image_encoder.img_size == 512


def test_image_size_only_for_vit_t(tmp_path):
    from micro_sam._checkpoints import CheckpointError, image_size_of
    from micro_sam.util import get_sam_model

    assert image_size_of({"model_state": {}}, "vit_b") == 1024
    assert image_size_of({"image_size": torch.tensor(512)}, "vit_t") == 512
    with pytest.raises(CheckpointError, match="only vit_t"):
        image_size_of({"image_size": 512}, "vit_b", "x.pt")
    bad = tmp_path / "bad_size.pt"
    torch.save({"model_state": build_sam_vit_t().state_dict(), "image_size": 500}, bad)
    with pytest.raises(CheckpointError, match="invalid image_size"):
        get_sam_model(model_type="vit_t", checkpoint_path=bad, device="cpu")


def test_automatic_segmentation_with_decoder(sam_512, tmp_path):
    """AIS and AMG run end to end at 512; the decoder is built for the encoder's input size."""
    from micro_sam.instance_segmentation import (
        AutomaticMaskGenerator, InstanceSegmentationWithDecoder, get_predictor_and_decoder, get_unetr,
    )

    torch.manual_seed(0)
    unetr = get_unetr(sam_512.image_encoder)
    decoder_state = {k: v for k, v in unetr.state_dict().items() if not k.startswith("encoder.")}
    path = tmp_path / "with_decoder.pt"
    torch.save({"model_state": sam_512.state_dict(), "decoder_state": decoder_state, "image_size": 512}, path)
    predictor, decoder = get_predictor_and_decoder("vit_t", checkpoint_path=path, device="cpu")
    assert decoder.encoder_img_size == 512
    image, _ = _image((384, 512), seed=2)
    segmenter = InstanceSegmentationWithDecoder(predictor, decoder)
    segmenter.initialize(image, verbose=False)
    segmentation = segmenter.generate()
    assert segmentation.shape == image.shape
    amg = AutomaticMaskGenerator(predictor, points_per_side=4)
    amg.initialize(image, verbose=False)
    amg_segmentation = amg.generate(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert amg_segmentation.shape == image.shape
