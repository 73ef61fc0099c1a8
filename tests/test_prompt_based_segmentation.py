"""Prompt-based segmentation: known answers from segment_anything's own SamPredictor on the same weights."""
import numpy as np
import pytest

from micro_sam import prompt_based_segmentation as pbs
from micro_sam import util

from conftest import make_tiny_predictor

SHAPE = (150, 250)  # non-square on purpose


def _fake_embeddings(shape, n_slices=None, seed=0):
    """Random features with the sizes SAM would give an image of this shape (no encoder run needed)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    rng = np.random.default_rng(seed)
    feature_shape = (1, 256, 64, 64) if n_slices is None else (n_slices, 1, 256, 64, 64)
    features = rng.standard_normal(feature_shape).astype("float32")
    input_size = ResizeLongestSide.get_preprocess_shape(shape[0], shape[1], 1024)
    return {"features": features, "input_size": tuple(input_size), "original_size": tuple(shape)}


@pytest.fixture(scope="module")
def predictor():
    return make_tiny_predictor(seed=1)


@pytest.fixture(scope="module")
def reference():
    """A plain segment_anything predictor with the same weights."""
    return make_tiny_predictor(seed=1)


@pytest.fixture(scope="module")
def embeddings():
    return _fake_embeddings(SHAPE)


def _sam(reference, embeddings, i=None, **kwargs):
    util.set_precomputed(reference, embeddings, i=i)
    return reference.predict(**kwargs)


def _assert_masks_match(masks, ref_masks):
    """Equal masks, up to a few pixels whose logit is within float rounding of the threshold.

    The mask decoder here computes SAM's function with reordered arithmetic
    (:mod:`micro_sam.models.fast_mask_decoder`), so logits differ from SamPredictor's by ~1e-6.
    """
    masks, ref_masks = np.asarray(masks), np.asarray(ref_masks)
    assert masks.shape == ref_masks.shape and masks.dtype == ref_masks.dtype
    assert np.count_nonzero(masks != ref_masks) <= max(2, 1e-4 * masks.size)


# --- equality with SamPredictor.predict --------------------------------------------------------------------
def test_single_positive_point_picks_best_multimask(predictor, reference, embeddings):
    points, labels = np.array([[40, 170]]), np.array([1])
    masks, scores, logits = pbs.segment_from_points(predictor, points, labels, embeddings, return_all=True)
    ref_masks, ref_scores, ref_logits = _sam(reference, embeddings, point_coords=np.array([[170, 40]]),
                                             point_labels=labels, multimask_output=True)
    best = int(np.argmax(ref_scores))
    assert masks.shape == (1,) + SHAPE and masks.dtype == bool
    _assert_masks_match(masks[0], ref_masks[best])
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert 0 < masks.sum() < masks.size  # a real mask, not trivially empty or full


def test_points_positive_and_negative(predictor, reference, embeddings):
    points, labels = np.array([[40.0, 170.0], [100.0, 30.0], [10.0, 240.0]]), np.array([1, 0, 1])
    masks = pbs.segment_from_points(predictor, points, labels, embeddings)
    ref_masks, _, _ = _sam(reference, embeddings, point_coords=points[:, ::-1], point_labels=labels,
                           multimask_output=False)
    assert masks.shape == (1,) + SHAPE
    _assert_masks_match(masks, ref_masks)

    masks = pbs.segment_from_points(predictor, points, labels, embeddings, multimask_output=True)
    ref_masks, _, _ = _sam(reference, embeddings, point_coords=points[:, ::-1], point_labels=labels,
                           multimask_output=True)
    assert masks.shape == (3,) + SHAPE
    _assert_masks_match(masks, ref_masks)


def test_use_best_multimask_off_for_single_point(predictor, reference, embeddings):
    points, labels = np.array([[40, 170]]), np.array([1])
    masks = pbs.segment_from_points(predictor, points, labels, embeddings, use_best_multimask=False)
    ref_masks, _, _ = _sam(reference, embeddings, point_coords=np.array([[170, 40]]), point_labels=labels,
                           multimask_output=False)
    _assert_masks_match(masks, ref_masks)


def test_box(predictor, reference, embeddings):
    box = np.array([20, 100, 90, 210])  # y0, x0, y1, x1
    masks, scores, _ = pbs.segment_from_box(predictor, box, embeddings, return_all=True)
    ref_masks, ref_scores, _ = _sam(reference, embeddings, box=np.array([100, 20, 210, 90]), multimask_output=False)
    _assert_masks_match(masks, ref_masks)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)

    # extension by 10% of the box size each side: 7 px in y, 11 px in x; and by 5 pixels
    masks = pbs.segment_from_box(predictor, box, embeddings, box_extension=0.1)
    ref_masks, _, _ = _sam(reference, embeddings, box=np.array([89, 13, 221, 97]), multimask_output=False)
    _assert_masks_match(masks, ref_masks)
    masks = pbs.segment_from_box(predictor, box, embeddings, box_extension=5)
    ref_masks, _, _ = _sam(reference, embeddings, box=np.array([95, 15, 215, 95]), multimask_output=False)
    _assert_masks_match(masks, ref_masks)

    # a box reaching beyond the image is clipped to it
    masks = pbs.segment_from_box(predictor, np.array([-10, 200, 60, 400]), embeddings)
    ref_masks, _, _ = _sam(reference, embeddings, box=np.array([200, 0, 250, 60]), multimask_output=False)
    _assert_masks_match(masks, ref_masks)


def test_box_and_points(predictor, reference, embeddings):
    box, points, labels = np.array([20, 100, 90, 210]), np.array([[50, 150], [30, 110]]), np.array([1, 0])
    masks = pbs.segment_from_box_and_points(predictor, box, points, labels, embeddings)
    ref_masks, _, _ = _sam(reference, embeddings, box=np.array([100, 20, 210, 90]),
                           point_coords=points[:, ::-1], point_labels=labels, multimask_output=False)
    _assert_masks_match(masks, ref_masks)


def test_mask_to_logits_known_answer():
    # a (300, 600) image is resized to (128, 256) on the logits grid and padded below with background
    mask = np.zeros((300, 600), dtype=bool)
    mask[60:180, 120:360] = True  # exactly 5/256 ... : the resized block is rows 25.6..76.8, cols 51.2..153.6
    logits = pbs._mask_to_logits(mask)
    assert logits.shape == (1, 256, 256) and logits.dtype == np.float32
    high = np.log(0.999 / 0.001)
    np.testing.assert_allclose(np.unique(logits), [-high, high], rtol=1e-6)
    foreground = logits[0] > 0
    rows, cols = np.where(foreground)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (26, 76, 51, 153)
    assert not foreground[128:].any()
    # a 256 x 256 mask is used as is
    square = np.zeros((256, 256), dtype=bool)
    square[10:20, 30:50] = True
    np.testing.assert_array_equal(pbs._mask_to_logits(square)[0] > 0, square)


def test_mask_prompts(predictor, reference, embeddings):
    mask = np.zeros(SHAPE, dtype="uint8")
    mask[30:80, 120:200] = 1
    box_xyxy = np.array([120, 30, 200, 80])

    masks = pbs.segment_from_mask(predictor, mask, embeddings, use_mask=False)
    ref_masks, _, _ = _sam(reference, embeddings, box=box_xyxy, multimask_output=False)
    _assert_masks_match(masks, ref_masks)

    masks, scores, logits = pbs.segment_from_mask(predictor, mask, embeddings, return_all=True)
    ref_masks, ref_scores, ref_logits = _sam(reference, embeddings, box=box_xyxy, mask_input=pbs._mask_to_logits(mask),
                                             multimask_output=False)
    _assert_masks_match(masks, ref_masks)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)

    logit_masks = pbs.segment_from_mask(predictor, mask, embeddings, use_mask=False, return_logits=True)
    assert logit_masks.dtype == np.float32
    np.testing.assert_array_equal(logit_masks > 0, pbs.segment_from_mask(predictor, mask, embeddings, use_mask=False))

    # the innermost point of a square is its centre
    square = np.zeros(SHAPE, dtype="uint8")
    square[30:80, 120:170] = 1
    masks = pbs.segment_from_mask(predictor, square, embeddings, use_box=False, use_mask=False, use_points=True,
                                  use_single_point=True)
    points, labels = pbs._points_from_mask(square.astype(bool), 0.0, use_single_point=True)
    assert labels.tolist() == [1]
    assert abs(points[0, 0] - 54.5) <= 1 and abs(points[0, 1] - 144.5) <= 1
    ref_masks, _, _ = _sam(reference, embeddings, point_coords=points[:, ::-1], point_labels=labels,
                           multimask_output=False)
    _assert_masks_match(masks, ref_masks)

    # explicit box and points replace the derived ones
    box, points, labels = np.array([10, 100, 100, 220]), np.array([[50, 150]]), np.array([1])
    masks = pbs.segment_from_mask(predictor, mask, embeddings, use_mask=False, box=box, points=points, labels=labels)
    ref_masks, _, _ = _sam(reference, embeddings, box=np.array([100, 10, 220, 100]), point_coords=points[:, ::-1],
                           point_labels=labels, multimask_output=False)
    _assert_masks_match(masks, ref_masks)

    # a downsampled mask with original_size is resized to the image first
    small = mask[::2, ::2]
    masks = pbs.segment_from_mask(predictor, small, embeddings, use_mask=False, original_size=SHAPE)
    ref_masks, _, _ = _sam(reference, embeddings, box=box_xyxy, multimask_output=False)
    _assert_masks_match(masks, ref_masks)


def test_points_from_mask():
    mask = np.zeros((100, 120), dtype=bool)
    mask[20:60, 30:50] = True  # an L-shape: two arms, a positive maximum in each
    mask[40:60, 30:100] = True
    points, labels = pbs._points_from_mask(mask, box_extension=0.2, use_single_point=False)
    positives, negatives = points[labels == 1].astype(int), points[labels == 0].astype(int)
    assert len(positives) >= 2 and len(negatives) >= 1
    assert mask[positives[:, 0], positives[:, 1]].all()
    assert not mask[negatives[:, 0], negatives[:, 1]].any()
    assert (positives[:, 1] < 50).any() and (positives[:, 1] > 60).any()  # one point per arm
    # negatives lie inside the box grown by 20% (8 px in y, 14 px in x)
    assert (negatives[:, 0] >= 12).all() and (negatives[:, 0] < 68).all()
    assert (negatives[:, 1] >= 16).all() and (negatives[:, 1] < 114).all()


# --- 3D and tiled embeddings ---------------------------------------------------------------------------------
def test_3d_slices(predictor, reference):
    embeddings = _fake_embeddings(SHAPE, n_slices=3, seed=3)
    points, labels = np.array([[60, 100], [20, 20]]), np.array([1, 0])
    results = {}
    for i in (0, 2, 0, 1):  # switching back and forth must not reuse the wrong slice
        results[i] = pbs.segment_from_points(predictor, points, labels, embeddings, i=i)
        ref_masks, _, _ = _sam(reference, embeddings, i=i, point_coords=points[:, ::-1], point_labels=labels,
                               multimask_output=False)
        _assert_masks_match(results[i], ref_masks)
    assert not np.array_equal(results[0], results[1])

    box = np.array([10, 10, 100, 120])
    masks = pbs.segment_from_box(predictor, box, embeddings, i=2)
    ref_masks, _, _ = _sam(reference, embeddings, i=2, box=box[[1, 0, 3, 2]], multimask_output=False)
    _assert_masks_match(masks, ref_masks)

    mask = np.zeros(SHAPE, bool)
    mask[30:60, 40:90] = True
    masks = pbs.segment_from_mask(predictor, mask, embeddings, i=1)
    ref_masks, _, _ = _sam(reference, embeddings, i=1, box=np.array([40, 30, 90, 60]),
                           mask_input=pbs._mask_to_logits(mask), multimask_output=False)
    _assert_masks_match(masks, ref_masks)


def test_predictor_state_after_set_image(predictor, reference):
    """Without embeddings the image set on the predictor is used; a cached state is not reused after set_image."""
    embeddings = _fake_embeddings(SHAPE, seed=5)
    points, labels = np.array([[60, 100]]), np.array([1])
    first = pbs.segment_from_points(predictor, points, labels, embeddings)
    util.set_precomputed(predictor, _fake_embeddings(SHAPE, seed=6))
    other = pbs.segment_from_points(predictor, points, labels)
    ref_masks, ref_scores, _ = _sam(reference, _fake_embeddings(SHAPE, seed=6), point_coords=points[:, ::-1],
                                    point_labels=labels, multimask_output=True)
    _assert_masks_match(other[0], ref_masks[np.argmax(ref_scores)])
    np.testing.assert_array_equal(pbs.segment_from_points(predictor, points, labels, embeddings), first)


@pytest.fixture(scope="module")
def tiled(predictor):
    rng = np.random.default_rng(0)
    image = (rng.random((160, 200)) * 255).astype("uint8")
    embeddings = util.precompute_image_embeddings(predictor, image, tile_shape=(80, 100), halo=(16, 20),
                                                  verbose=False)
    return image, embeddings


def _untiled_on_tile(reference, image, tile_id, **prompts):
    """The known answer: the untiled predictor on the tile's outer block, pasted at the tile offset."""
    from micro_sam import _tiling

    tile = _tiling.get_tile(tile_id, image.shape, (80, 100), (16, 20))
    block = util.precompute_image_embeddings(reference, image[tile.outer], verbose=False)
    util.set_precomputed(reference, block)
    oy, ox = tile.offset
    if "point_coords" in prompts:
        prompts["point_coords"] = prompts["point_coords"] - np.array([ox, oy])
    if "box" in prompts:
        prompts["box"] = prompts["box"] - np.array([ox, oy, ox, oy])
    masks, scores, _ = reference.predict(**prompts)
    full = np.zeros((len(masks),) + image.shape, dtype=bool)
    full[(slice(None),) + tile.outer] = masks
    return full, scores


def test_tiled_routing(predictor, reference, tiled):
    image, embeddings = tiled
    # tile 3 is the bottom right one (2 x 2 tiles); its outer block starts at (64, 80)
    points, labels = np.array([[120, 150], [100, 170]]), np.array([1, 0])
    masks = pbs.segment_from_points(predictor, points, labels, embeddings)
    expected, _ = _untiled_on_tile(reference, image, 3, point_coords=points[:, ::-1].astype(float),
                                   point_labels=labels, multimask_output=False)
    assert masks.shape == (1, 160, 200)
    _assert_masks_match(masks, expected)
    assert not masks[:, :64].any() and not masks[:, :, :80].any()

    # a box centred in tile 1 (top right; outer block rows 0:96, cols 80:200)
    box = np.array([10, 110, 60, 190])
    masks = pbs.segment_from_box(predictor, box, embeddings)
    expected, _ = _untiled_on_tile(reference, image, 1, box=box[[1, 0, 3, 2]], multimask_output=False)
    _assert_masks_match(masks, expected)

    # a mask centred in tile 2 (bottom left): its box and mask prompt are computed in the tile
    mask = np.zeros(image.shape, bool)
    mask[100:140, 20:60] = True
    masks = pbs.segment_from_mask(predictor, mask, embeddings, use_mask=False)
    expected, _ = _untiled_on_tile(reference, image, 2, box=np.array([20, 100, 60, 140]), multimask_output=False)
    _assert_masks_match(masks, expected)


def test_tiled_points_outside_the_tile_are_dropped(predictor, tiled):
    _, embeddings = tiled
    # the centre (79, 90) lies in tile 0 (outer block rows 0:96, cols 0:120); the point at x=150 lies outside it
    with pytest.warns(UserWarning, match="outside tile 0"):
        masks = pbs.segment_from_points(predictor, np.array([[60, 30], [98, 150]]), np.array([1, 0]), embeddings)
    # what remains is a single positive point: the best of the multimask outputs is chosen
    expected = pbs.segment_from_points(predictor, np.array([[60, 30]]), np.array([1]), embeddings)
    np.testing.assert_array_equal(masks, expected)


# --- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda p, e: pbs.segment_from_points(p, np.array([[10, 300]]), np.array([1]), e), "points .* outside"),
    (lambda p, e: pbs.segment_from_points(p, np.array([[-1, 3]]), np.array([1]), e), "points .* outside"),
    (lambda p, e: pbs.segment_from_points(p, np.array([10, 30]), np.array([1]), e), "points must be"),
    (lambda p, e: pbs.segment_from_points(p, np.array([[10, 30]]), np.array([1, 0]), e), "labels must have"),
    (lambda p, e: pbs.segment_from_points(p, np.array([[10, 30]]), np.array([2]), e), "labels must be 0"),
    (lambda p, e: pbs.segment_from_points(p, np.array([[np.nan, 30]]), np.array([1]), e), "points contain NaN"),
    (lambda p, e: pbs.segment_from_box(p, np.array([50, 10, 20, 40]), e), "box .* empty"),
    (lambda p, e: pbs.segment_from_box(p, np.array([20, 10, 20, 40]), e), "box .* empty"),
    (lambda p, e: pbs.segment_from_box(p, np.array([200, 10, 220, 40]), e), "box .* outside"),
    (lambda p, e: pbs.segment_from_box(p, np.array([1, 2, 3]), e), "box must be"),
    (lambda p, e: pbs.segment_from_box(p, np.array([1, 2, 30, 40]), e, box_extension=-1), "box_extension"),
    (lambda p, e: pbs.segment_from_mask(p, np.zeros(SHAPE), e), "mask is empty"),
    (lambda p, e: pbs.segment_from_mask(p, np.ones((10, 10)), e), "mask has shape"),
    (lambda p, e: pbs.segment_from_mask(p, np.ones(SHAPE), e, use_box=False, use_mask=False), "needs a prompt"),
    (lambda p, e: pbs.segment_from_points(p, np.array([[10, 30]]), np.array([1]), e, i=0), "i=0"),
    (lambda p, e: pbs.segment_from_points(p, np.array([[10, 30]]), np.array([1]), None, i=0),
     "without image_embeddings"),
])
def test_bad_input(predictor, embeddings, call, match):
    with pytest.raises(ValueError, match=match):
        call(predictor, embeddings)


def test_bad_slice_index(predictor):
    embeddings = _fake_embeddings(SHAPE, n_slices=2)
    points, labels = np.array([[10, 30]]), np.array([1])
    with pytest.raises(ValueError, match="i=2 is out of range"):
        pbs.segment_from_points(predictor, points, labels, embeddings, i=2)
    with pytest.raises(ValueError, match="pass the slice index i"):
        pbs.segment_from_points(predictor, points, labels, embeddings)


def test_no_image_set():
    from segment_anything import SamPredictor

    from conftest import make_tiny_sam

    with pytest.raises(ValueError, match="no image set"):
        pbs.segment_from_box(SamPredictor(make_tiny_sam()), np.array([0, 0, 10, 10]))


def test_inputs_not_modified(predictor, embeddings):
    points, labels, box = np.array([[40.0, 170.0]]), np.array([1]), np.array([20, 100, 90, 210])
    mask = np.zeros(SHAPE, "uint8")
    mask[30:80, 120:200] = 1
    copies = [a.copy() for a in (points, labels, box, mask)]
    features = embeddings["features"].copy()
    pbs.segment_from_box_and_points(predictor, box, points, labels, embeddings)
    pbs.segment_from_mask(predictor, mask, embeddings, use_points=True)
    for array, copy in zip((points, labels, box, mask), copies):
        np.testing.assert_array_equal(array, copy)
    np.testing.assert_array_equal(embeddings["features"], features)


def test_vit_t_matches_sam_predictor(vit_t_predictor):
    """The MobileSAM-compatible vit_t model goes through the same decoder path."""
    embeddings = _fake_embeddings(SHAPE, seed=9)
    points, labels = np.array([[40, 170]]), np.array([1])
    masks, scores, _ = pbs.segment_from_points(vit_t_predictor, points, labels, embeddings, return_all=True)
    box = np.array([20, 100, 90, 210])
    box_masks = pbs.segment_from_box(vit_t_predictor, box, embeddings)

    util.set_precomputed(vit_t_predictor, embeddings)
    ref_masks, ref_scores, _ = vit_t_predictor.predict(point_coords=np.array([[170, 40]]), point_labels=labels,
                                                       multimask_output=True)
    _assert_masks_match(masks[0], ref_masks[np.argmax(ref_scores)])
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    ref_box, _, _ = vit_t_predictor.predict(box=box[[1, 0, 3, 2]], multimask_output=False)
    _assert_masks_match(box_masks, ref_box)
