import pickle

import numpy as np
import pytest

from micro_sam.instance_segmentation import (
    AutomaticMaskGenerator, TiledAutomaticMaskGenerator, get_instance_segmentation_generator,
)
from micro_sam.instance_segmentation import _mask_store as store

from ._models import make_stub_predictor, tiled_embeddings_with_ids
from .test_postprocessing import _matched_ious


def _disks(shape, n, radius, seed, margin=2):
    """A label image of non-overlapping disks (radius in [radius[0], radius[1]))."""
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype="uint32")
    k = 0
    for _ in range(1000):
        r = int(rng.integers(*radius))
        c = rng.integers(r, shape[0] - r), rng.integers(r, shape[1] - r)
        rr, cc = disk(c, r + margin, shape=shape)
        if labels[rr, cc].any():
            continue
        rr, cc = disk(c, r, shape=shape)
        k += 1
        labels[rr, cc] = k
        if k == n:
            break
    return labels


@pytest.fixture(scope="module")
def scene():
    labels = _disks((192, 256), 14, (12, 20), seed=0)
    return labels, (labels > 0).astype("float32")


def _amg(labels, img_size=512, slope=20.0, **kwargs):
    predictor, embeddings = make_stub_predictor(labels, img_size=img_size, slope=slope)
    return AutomaticMaskGenerator(predictor, **kwargs), embeddings, predictor


def test_amg_recovers_objects(scene):
    labels, image = scene
    amg, embeddings, _ = _amg(labels, points_per_side=16)
    assert not amg.is_initialized
    amg.initialize(image, image_embeddings=embeddings)
    seg = amg.generate()
    assert seg.dtype == np.uint32 and seg.shape == labels.shape
    assert seg.max() == labels.max()
    ious, one_to_one = _matched_ious(seg, labels)
    assert one_to_one and ious.min() > 0.85, ious.min()


def test_amg_filters_and_nms(scene):
    labels, image = scene
    amg, embeddings, predictor = _amg(labels, points_per_side=16)
    amg.initialize(image, image_embeddings=embeddings)
    hits = np.array(predictor.model.hits)
    assert len(hits) == 256
    n_object_points = int((hits > 0).sum())

    # Predicted IoU filter: the stub predicts 0.96 (object), 0.85 (grown object), 0.8 (all objects), 0.5 (bg).
    assert amg.generate(pred_iou_thresh=0.97).max() == 0
    records = amg.generate(pred_iou_thresh=0.95, output_mode="binary_mask")
    # Several points per object give the same mask: box NMS keeps exactly one per object.
    assert len(records) == labels.max()
    for record in records:
        ids, counts = np.unique(labels[record["segmentation"]], return_counts=True)
        assert record["predicted_iou"] == pytest.approx(0.96)
        assert ids[np.argmax(counts)] > 0
        assert record["area"] == record["segmentation"].sum()
        x, y, w, h = record["bbox"]
        rows, cols = np.nonzero(record["segmentation"])
        assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max(), rows.max())
        px, py = record["point_coords"][0]
        assert record["segmentation"][int(py), int(px)]
        assert record["crop_box"] == [0, 0, labels.shape[1], labels.shape[0]]
    # Without NMS every object point keeps its mask.
    no_nms = amg.generate(pred_iou_thresh=0.95, box_nms_thresh=1.0, output_mode="binary_mask")
    assert len(no_nms) == n_object_points
    # Stability filter: the scores of the records decide which masks pass.
    stabilities = np.array([r["stability_score"] for r in no_nms])
    assert (stabilities > 0.9).all()
    assert len(amg.generate(pred_iou_thresh=0.95, stability_score_thresh=1.0, box_nms_thresh=1.0,
                            output_mode="binary_mask")) == int((stabilities >= 1.0).sum())
    # Shallow logits (an uncertain model) give unstable masks that the default threshold removes.
    shallow, shallow_embeddings, _ = _amg(labels, slope=0.2, points_per_side=16)
    shallow.initialize(image, image_embeddings=shallow_embeddings)
    unstable = shallow.generate(pred_iou_thresh=0.95, stability_score_thresh=0, box_nms_thresh=1.0,
                                output_mode="binary_mask")
    scores = np.array([r["stability_score"] for r in unstable])
    assert len(unstable) == n_object_points and scores.min() < 0.95
    kept = shallow.generate(pred_iou_thresh=0.95, stability_score_thresh=0.95, box_nms_thresh=1.0,
                            output_mode="binary_mask")
    assert len(kept) == int((scores >= np.float32(0.95)).sum()) < len(unstable)
    # Without thresholds and NMS also the background masks come through. They cover the background, which
    # with_background=False keeps as an object and with_background=True removes.
    params = dict(pred_iou_thresh=0, stability_score_thresh=0, box_nms_thresh=1.0)
    keep_bg = amg.generate(with_background=False, **params)
    ids, sizes = np.unique(keep_bg, return_counts=True)
    assert ids[0] != 0 or sizes[0] < sizes[1:].max()
    background_id = ids[np.argmax(sizes)]
    assert np.mean(labels[keep_bg == background_id] == 0) > 0.99
    assert (keep_bg == background_id).sum() > 0.7 * (labels == 0).sum()  # (grown object masks paint over it)
    remove_bg = amg.generate(with_background=True, **params)
    from micro_sam.instance_segmentation.postprocessing import relabel_sequential
    np.testing.assert_array_equal(remove_bg, relabel_sequential(np.where(keep_bg == background_id, 0, keep_bg)))


def test_amg_equals_segment_anything(scene):
    """Same masks, boxes, scores and points as segment_anything's SamAutomaticMaskGenerator."""
    from segment_anything import SamAutomaticMaskGenerator

    labels, image = scene
    amg, embeddings, predictor = _amg(labels, points_per_side=12)
    amg.initialize(image, image_embeddings=embeddings)
    params = dict(pred_iou_thresh=0.82, stability_score_thresh=0.9, box_nms_thresh=0.5)
    ours = amg.generate(output_mode="binary_mask", **params)
    reference = SamAutomaticMaskGenerator(predictor.model, points_per_side=12, output_mode="binary_mask",
                                          **params).generate(np.repeat(image[..., None] * 255, 3, -1).astype("uint8"))
    assert len(ours) == len(reference) > labels.max()
    for a, b in zip(ours, reference):
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
        assert a["bbox"] == b["bbox"] and a["area"] == b["area"] and a["crop_box"] == b["crop_box"]
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"])
        assert a["stability_score"] == pytest.approx(b["stability_score"])
        np.testing.assert_allclose(a["point_coords"], b["point_coords"])


def test_amg_batching_state_and_output_modes(scene):
    labels, image = scene
    amg, embeddings, _ = _amg(labels, points_per_side=8)
    with pytest.raises(RuntimeError, match="initialize"):
        amg.generate()
    amg.initialize(image, image_embeddings=embeddings)
    seg = amg.generate()
    small_batches, _, _ = _amg(labels, points_per_side=8, points_per_batch=7)
    small_batches.initialize(image, image_embeddings=embeddings)
    np.testing.assert_array_equal(small_batches.generate(), seg)

    state = pickle.loads(pickle.dumps(amg.get_state()))
    restored, _, _ = _amg(labels, points_per_side=8)
    restored.set_state(state)
    assert restored.is_initialized
    np.testing.assert_array_equal(restored.generate(), seg)
    restored.clear_state()
    assert not restored.is_initialized

    binary = amg.generate(output_mode="binary_mask")
    rles = amg.generate(output_mode="rle")
    assert len(binary) == len(rles) > 0
    for b, r in zip(binary, rles):
        np.testing.assert_array_equal(store.rle_decode(r["segmentation"]), b["segmentation"])
        assert sum(r["segmentation"]["counts"][1::2]) == b["area"]
    with pytest.raises(ValueError, match="output_mode"):
        amg.generate(output_mode="labels")
    # Small region post-processing keeps these (solid, large) objects as they are.
    np.testing.assert_array_equal(amg.generate(min_mask_region_area=20), seg)


def test_amg_input_errors(scene):
    labels, image = scene
    amg, embeddings, predictor = _amg(labels, points_per_side=4)
    _, other_embeddings = make_stub_predictor(labels[:100], img_size=512)
    with pytest.raises(ValueError, match="shape"):
        amg.initialize(image, image_embeddings=other_embeddings)
    with pytest.raises(ValueError, match="2D image"):
        amg.initialize(np.zeros((4, 5, 6, 7)), image_embeddings=embeddings)
    with pytest.raises(ValueError, match="not both"):
        AutomaticMaskGenerator(predictor, point_grids=[np.zeros((4, 2))])
    with pytest.raises(ValueError, match="points_per_side or point_grids"):
        AutomaticMaskGenerator(predictor, points_per_side=None)
    grid_amg = AutomaticMaskGenerator(predictor, points_per_side=None, point_grids=[np.array([[0.5, 0.5]])])
    grid_amg.initialize(image, image_embeddings=embeddings)
    assert len(grid_amg.crop_list[0]["iou_preds"]) == 3


def test_amg_empty_image():
    labels = np.zeros((64, 96), dtype="uint32")
    amg, embeddings, _ = _amg(labels, img_size=256, points_per_side=4)
    amg.initialize(labels.astype("float32"), image_embeddings=embeddings)
    seg = amg.generate()
    assert seg.shape == labels.shape and seg.max() == 0
    assert amg.generate(output_mode="binary_mask") == []


def test_mask_store_roundtrip():
    import torch

    rng = np.random.default_rng(0)
    masks = rng.random((5, 20, 30)) > 0.7
    masks[1] = False
    masks[2] = False
    masks[2, 3:7, 10:12] = True
    boxes = store.masks_to_boxes(torch.from_numpy(masks)).numpy()
    assert boxes[1].tolist() == [0, 0, 0, 0] and boxes[2].tolist() == [10, 3, 11, 6]
    bits, offsets, areas = store.pack(masks, boxes)
    table = {"iou_preds": np.zeros(5, "float32"), "stability_score": np.zeros(5, "float32"), "boxes": boxes,
             "points": np.zeros((5, 2)), "areas": areas, "mask_bits": bits, "mask_offsets": offsets}
    assert areas.tolist() == masks.sum((1, 2)).tolist()
    for k in range(5):
        np.testing.assert_array_equal(store.unpack_full(table, k, (20, 30)), masks[k])
    picked = store.select(table, np.array([4, 2]))
    np.testing.assert_array_equal(store.unpack_full(picked, 1, (20, 30)), masks[2])
    both = store.concatenate([picked, table])
    np.testing.assert_array_equal(store.unpack_full(both, 2 + 3, (20, 30)), masks[3])
    np.testing.assert_array_equal(store.rle_decode(store.rle_encode(masks[0])), masks[0])
    # Stability: IoU of the masks at +-offset.
    logits = torch.tensor([[[-2.0, -0.5, 0.5, 2.0]]])
    assert float(store.stability_score(logits, 0.0, 1.0)[0]) == pytest.approx(1 / 3)


def test_tiled_amg_is_seamless():
    """Objects crossing tile borders are found once and whole."""
    from ._models import StubSam
    from segment_anything import SamPredictor

    labels = _disks((256, 384), 24, (10, 15), seed=2)
    tile_shape, halo = (128, 128), (40, 40)
    # some objects lie across tile borders
    assert len(np.unique(labels[127:129])) > 2 and len(np.unique(labels[:, 127:129])) > 2
    predictor = SamPredictor(StubSam(labels, img_size=512, tiling=(tile_shape, halo)))
    embeddings = tiled_embeddings_with_ids(labels.shape, tile_shape, halo, img_size=512)
    amg = get_instance_segmentation_generator(predictor, is_tiled=True, points_per_side=12)
    assert isinstance(amg, TiledAutomaticMaskGenerator)
    amg.initialize(labels.astype("float32"), image_embeddings=embeddings)
    assert len(amg.crop_boxes) == 6
    seg = amg.generate(pred_iou_thresh=0.95)
    ious, one_to_one = _matched_ious(seg, labels)
    assert one_to_one and ious.min() > 0.85, ious.min()
    assert seg.max() == labels.max()
    records = amg.generate(pred_iou_thresh=0.95, output_mode="binary_mask")
    assert len(records) == labels.max()
    assert records[0]["segmentation"].shape == labels.shape

    state = pickle.loads(pickle.dumps(amg.get_state()))
    restored = TiledAutomaticMaskGenerator(predictor, points_per_side=12)
    restored.set_state(state)
    np.testing.assert_array_equal(restored.generate(pred_iou_thresh=0.95), seg)


def _table(masks, crop_box, iou=0.96):
    import torch

    x0, y0, x1, y1 = crop_box
    local = np.stack([m[y0:y1, x0:x1] for m in masks])
    boxes = store.masks_to_boxes(torch.from_numpy(local)).numpy()
    bits, offsets, areas = store.pack(local, boxes)
    n = len(masks)
    return {"iou_preds": np.full(n, iou, "float32"), "stability_score": np.ones(n, "float32"), "boxes": boxes,
            "points": np.zeros((n, 2)), "areas": areas, "mask_bits": bits, "mask_offsets": offsets}


def test_tiled_amg_removes_duplicates_across_tiles():
    """Two tiles segment the same object differently (box IoU below the NMS threshold): the mask of the tile
    owning the object's centre is kept."""
    from skimage.draw import disk

    shape = (100, 200)
    exact, grown = np.zeros(shape, bool), np.zeros(shape, bool)
    exact[disk((50, 95), 15, shape=shape)] = True
    grown[disk((50, 95), 19, shape=shape)] = True
    crop_boxes = [[0, 0, 145, 100], [55, 0, 200, 100]]  # tiles (100, 100) with halo (0, 45)
    state = {"crop_list": [_table([exact], crop_boxes[0]), _table([grown], crop_boxes[1])],
             "crop_boxes": crop_boxes, "original_size": shape,
             "inner_boxes": [[0, 0, 100, 100], [100, 0, 200, 100]]}
    predictor, _ = make_stub_predictor(np.zeros(shape, "uint32"), img_size=256)
    amg = TiledAutomaticMaskGenerator(predictor, points_per_side=4)
    amg.set_state(state)
    records = amg.generate(output_mode="binary_mask")
    assert len(records) == 1
    np.testing.assert_array_equal(records[0]["segmentation"], exact)
    np.testing.assert_array_equal(amg.generate(), exact.astype("uint32"))
    # Without the tiles' inner boxes (e.g. a state from micro_sam) both masks are kept, as in micro_sam.
    del state["inner_boxes"]
    amg.set_state(state)
    assert len(amg.generate(output_mode="binary_mask")) == 2


def test_amg_with_real_decoder_matches_segment_anything(scene):
    """With a real (tiny, random) SAM the fast mask decoder path gives segment_anything's masks."""
    import sys
    from pathlib import Path

    from segment_anything import SamAutomaticMaskGenerator

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import make_tiny_predictor

    from micro_sam.util import precompute_image_embeddings

    labels, image = scene
    predictor = make_tiny_predictor(seed=3)
    embeddings = precompute_image_embeddings(predictor, image, verbose=False)
    params = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.7)
    amg = AutomaticMaskGenerator(predictor, points_per_side=6)
    amg.initialize(image, image_embeddings=embeddings)
    ours = amg.generate(output_mode="binary_mask", **params)
    rgb = np.repeat(image[..., None] * 255, 3, -1).astype("uint8")
    reference = SamAutomaticMaskGenerator(predictor.model, points_per_side=6, output_mode="binary_mask",
                                          **params).generate(rgb)
    assert len(ours) == len(reference) > 0
    # A random model's logits are close to the threshold almost everywhere, so rounding flips some pixels.
    for a, b in zip(ours, reference):
        differ = np.count_nonzero(a["segmentation"] != b["segmentation"])
        assert differ <= 1e-3 * a["segmentation"].size
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], rel=1e-4, abs=1e-5)
