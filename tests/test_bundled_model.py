"""The bundled demo model: registered, offline, small, and as good as the README says on held-out images."""
import os

import numpy as np
import pytest
import tifffile

from micro_sam import _registry

# The README's numbers (8 held-out images, scripts/train_demo_model.py) are the reference; these tests check two
# other held-out images (measured: mSA 0.767, point IoU 0.861) and the sample image (mSA 0.746) against the
# thresholds below, a little under the measured values, so that a regression shows. (On the README's 8 held-out
# images the file reaches both aims of issue 7: mSA 0.747 >= 0.6, point IoU 0.856 >= 0.85.)
MIN_AIS_MSA = 0.74
MIN_POINT_IOU = 0.84
MIN_SAMPLE_MSA = 0.73
MIN_DIM_16BIT_MSA = 0.25  # measured 0.30: the model is poor on dim 16-bit looks (docs/demo_model.md)


@pytest.fixture(scope="module")
def demo():
    from micro_sam.instance_segmentation import get_predictor_and_decoder

    return get_predictor_and_decoder("vit_t_demo", device="cpu")


def test_registered_and_small():
    import torch

    from micro_sam._sam_loading import compute_hash

    assert "vit_t_demo" in _registry.get_model_names()
    entry = _registry.get_entry("vit_t_demo")
    path = _registry.bundled_path(entry)
    assert entry.architecture == "vit_t" and entry.url is None
    assert compute_hash(path) == entry.known_hash
    assert os.path.getsize(path) <= 45e6
    state = torch.load(path, weights_only=True, map_location="cpu")
    assert state["image_size"] == 640
    tensors = list(state["model_state"].values()) + list(state["decoder_state"].values())
    floating = [t for t in tensors if torch.is_floating_point(t)]
    assert floating and all(t.dtype == torch.float16 for t in floating)


def test_loads_offline(monkeypatch):
    import pooch

    from micro_sam.util import get_sam_model

    def no_network(*args, **kwargs):
        raise AssertionError("the bundled model must not be downloaded")

    monkeypatch.setattr(pooch, "retrieve", no_network)
    predictor = get_sam_model(model_type="vit_t_demo", device="cpu")
    assert predictor.model_type == "vit_t" and predictor.model.image_encoder.img_size == 640
    assert predictor._hash == _registry.get_entry("vit_t_demo").known_hash


def test_held_out_quality(demo):
    from micro_sam.evaluation.metrics import mean_segmentation_accuracy
    from micro_sam.evaluation.point_prompts import point_prompt_ious
    from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder
    from micro_sam.sample_data import synthetic_cells_2d, synthetic_nuclei_2d
    from micro_sam.util import precompute_image_embeddings

    predictor, decoder = demo
    segmenter = InstanceSegmentationWithDecoder(predictor, decoder)
    msa, ious = [], []
    # seeds far from those of the training (42000-42127), validation (42500+) and test (42900+) images
    for generate, seed in ((synthetic_nuclei_2d, 777), (synthetic_cells_2d, 778)):
        image, labels = generate((512, 512), seed=seed)
        embeddings = precompute_image_embeddings(predictor, image, verbose=False)
        segmenter.initialize(image, image_embeddings=embeddings)
        msa.append(mean_segmentation_accuracy(segmenter.generate(), labels))
        ious.extend(point_prompt_ious(predictor, image, labels, image_embeddings=embeddings).values())
    assert np.mean(msa) >= MIN_AIS_MSA, msa
    assert np.mean(ious) >= MIN_POINT_IOU


def test_readme_first_command(tmp_path):
    """The README's first command: segment the bundled sample image, write labels and an overlay."""
    import imageio.v3 as imageio

    from micro_sam.automatic_segmentation import main
    from micro_sam.evaluation.metrics import mean_segmentation_accuracy
    from micro_sam.sample_data import sample_image_path, sample_labels_path

    out = tmp_path / "segmentation.tif"
    assert main(["-i", sample_image_path(), "-o", str(out), "-m", "vit_t_demo", "--overlay"]) == 0
    labels = tifffile.imread(out)
    assert labels.shape == (512, 512)
    assert imageio.imread(tmp_path / "segmentation_overlay.png").shape[:2] == (512, 512)
    assert mean_segmentation_accuracy(labels, tifffile.imread(sample_labels_path())) >= MIN_SAMPLE_MSA


def _empty_image_definitions():
    import json

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        "demo_model_styles.json")
    with open(path) as f:
        return json.load(f)["empty"]


@pytest.mark.parametrize("entry", _empty_image_definitions(), ids=lambda e: e["name"])
def test_images_without_objects_give_none(demo, entry):
    """The blank, constant and pure-noise images of the held-out evaluation (sizes 256 x 256 to 1024 x 1024, uint8,
    uint16, float32): no objects, untiled and tiled (before issue 23: 39, 57, 56 and 192-268 objects)."""
    from micro_sam._synthetic_styles import render_style, style_from_dict
    from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder, TiledInstanceSegmentationWithDecoder

    image, labels = render_style(style_from_dict(entry["style"]), tuple(entry["shape"]),
                                 np.random.default_rng(entry["seed"]))
    assert labels.max() == 0
    segmenter = InstanceSegmentationWithDecoder(*demo)
    segmenter.initialize(image)
    assert segmenter.generate().max() == 0
    tiled = TiledInstanceSegmentationWithDecoder(*demo)
    tiled.initialize(image, tile_shape=(192, 192), halo=(32, 32))
    result = tiled.generate()
    assert result.shape == image.shape and result.max() == 0


def test_same_segmentation_for_an_image_times_a_constant(demo):
    """A dim 16-bit image and the same image times 7 give the model the same input (each image is stretched to its
    own minimum and maximum) and the same segmentation; as float divided by 1000 the input differs by at most one
    grey level (micro_sam's rounding down after the float32 division; on this look that changes the segmentation,
    see docs/demo_model.md)."""
    from micro_sam._image import to_image
    from micro_sam.evaluation.metrics import mean_segmentation_accuracy
    from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder
    from micro_sam.sample_data import synthetic_styled_2d

    style = {"radius_range": (8, 14), "photons": 40, "background": 0.3, "offset": 90, "gain": 2.0,
             "dtype": "uint16", "read_noise": 1.5}
    image, labels = synthetic_styled_2d((256, 256), seed=3, style=style)
    assert image.max() < 400  # dim: a few hundred grey values of 65535
    assert np.array_equal(to_image(image * 7), to_image(image))
    assert np.abs(to_image(image.astype("float32") / 1000).astype(int) - to_image(image)).max() <= 1
    segmenter = InstanceSegmentationWithDecoder(*demo)
    results = []
    for scaled in (image, image * 7):
        segmenter.initialize(scaled)
        results.append(segmenter.generate())
    assert mean_segmentation_accuracy(results[0], labels) >= MIN_DIM_16BIT_MSA
    assert np.array_equal(results[1], results[0])
