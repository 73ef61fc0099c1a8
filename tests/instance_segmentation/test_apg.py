import numpy as np
import pytest

from micro_sam.instance_segmentation import (
    AutomaticPromptGenerator, TiledAutomaticPromptGenerator, get_instance_segmentation_generator,
)
from micro_sam.instance_segmentation.apg import derive_box_prompts, derive_point_prompts, object_centers

from ._models import StubDecoder, StubSam, make_stub_predictor, tiled_embeddings_with_ids
from ._targets import decoder_targets
from .test_amg import _disks
from .test_postprocessing import _matched_ious


@pytest.fixture(scope="module")
def scene():
    labels = _disks((160, 192), 10, (10, 16), seed=4)
    return labels, np.stack(decoder_targets(labels))


def test_object_centers_and_prompts():
    seg = np.zeros((20, 30), dtype="uint32")
    seg[2:9, 3:10] = 1     # 7 x 7 square: centre (5, 6)
    seg[10:19, 15:28] = 2  # 9 x 13 rectangle: centre row 14
    centers = object_centers(seg)
    assert centers[0].tolist() == [5, 6]
    assert centers[1][0] == 14 and 18 <= centers[1][1] <= 24
    maps = decoder_targets(seg)
    prompts = derive_point_prompts(*maps)
    assert prompts["points"].shape == (2, 1, 2) and prompts["point_labels"].tolist() == [[1], [1]]
    for (x, y), k in zip(prompts["points"][:, 0], (1, 2)):
        assert seg[int(y), int(x)] == k
    assert derive_point_prompts(*maps, foreground_threshold=2.0) is None
    boxes = derive_box_prompts([{"segmentation": seg == 1, "bbox": [3, 2, 6, 6]}], box_extension=0.5)["boxes"]
    np.testing.assert_allclose(boxes, [[0, 0, 12, 11]])


def test_apg_recovers_objects(scene):
    labels, maps = scene
    predictor, embeddings = make_stub_predictor(labels, img_size=512)
    segmenter = get_instance_segmentation_generator(predictor, is_tiled=False, decoder=StubDecoder(maps),
                                                    segmentation_mode="apg")
    assert isinstance(segmenter, AutomaticPromptGenerator)
    with pytest.raises(RuntimeError, match="initialize"):
        segmenter.generate()
    segmenter.initialize(labels.astype("float32"), image_embeddings=embeddings)
    seg = segmenter.generate()
    hits = np.array(predictor.model.hits)
    assert len(hits) == labels.max() and set(hits) == set(range(1, labels.max() + 1))  # one prompt per object
    ious, one_to_one = _matched_ious(seg, labels)
    assert one_to_one and seg.max() == labels.max() and ious.min() > 0.85
    records = segmenter.generate(output_mode="binary_mask")
    assert len(records) == labels.max()
    assert segmenter.generate(min_size=10 ** 6).max() == 0
    assert segmenter.generate(center_distance_threshold=0).max() == 0


def test_tiled_apg(scene):
    labels, maps = scene
    tile_shape, halo = (96, 96), (32, 32)
    from segment_anything import SamPredictor

    predictor = SamPredictor(StubSam(labels, img_size=512, tiling=(tile_shape, halo)))
    segmenter = TiledAutomaticPromptGenerator(predictor, StubDecoder(maps, tiling=(tile_shape, halo)))
    segmenter.initialize(labels.astype("float32"),
                         image_embeddings=tiled_embeddings_with_ids(labels.shape, tile_shape, halo, img_size=512))
    seg = segmenter.generate()
    ious, one_to_one = _matched_ious(seg, labels)
    assert one_to_one and seg.max() == labels.max() and ious.min() > 0.8
