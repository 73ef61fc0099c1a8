import pickle

import numpy as np
import pytest

from micro_sam.instance_segmentation import (
    InstanceSegmentationWithDecoder, TiledInstanceSegmentationWithDecoder, get_instance_segmentation_generator,
)

from ._models import StubDecoder, make_stub_predictor, tiled_embeddings_with_ids
from ._targets import decoder_targets
from .test_postprocessing import _matched_ious


@pytest.fixture(scope="module")
def cells():
    from micro_sam.sample_data import synthetic_cells_2d

    image, labels = synthetic_cells_2d(shape=(200, 260), seed=3)
    return image, labels, np.stack(decoder_targets(labels))


def _segmenter(labels, maps, **kwargs):
    predictor, embeddings = make_stub_predictor(labels, img_size=256)
    return InstanceSegmentationWithDecoder(predictor, StubDecoder(maps, **kwargs)), embeddings


def test_ais_recovers_labels(cells):
    image, labels, maps = cells
    segmenter, embeddings = _segmenter(labels, maps)
    assert not segmenter.is_initialized
    segmenter.initialize(image, image_embeddings=embeddings)
    assert segmenter.is_initialized
    seg = segmenter.generate()
    assert seg.dtype == np.uint32 and seg.shape == labels.shape
    assert seg.max() == labels.max()
    ious, one_to_one = _matched_ious(seg, labels)
    assert one_to_one and ious.min() > 0.9  # foreground smoothing may shave a boundary pixel
    # Without smoothing of the foreground the foreground is exact.
    exact = segmenter.generate(foreground_smoothing=0)
    np.testing.assert_array_equal(exact > 0, labels > 0)
    # Thresholds change the result: no seeds -> no objects; a large min_size removes everything.
    assert segmenter.generate(center_distance_threshold=0.0).max() == 0
    assert segmenter.generate(min_size=10 ** 6).max() == 0


def test_ais_records_state_and_errors(cells, tmp_path):
    image, labels, maps = cells
    segmenter, embeddings = _segmenter(labels, maps)
    with pytest.raises(RuntimeError, match="initialize"):
        segmenter.generate()
    with pytest.raises(RuntimeError, match="initialize"):
        segmenter.get_state()
    segmenter.initialize(image, image_embeddings=embeddings)
    seg = segmenter.generate()
    records = segmenter.generate(output_mode="binary_mask")
    assert len(records) == seg.max()
    for record in records:
        np.testing.assert_array_equal(record["segmentation"], seg == record["seg_id"])
        assert record["area"] == (seg == record["seg_id"]).sum()
    with pytest.raises(ValueError, match="output_mode"):
        segmenter.generate(output_mode="rle")

    # The state round-trips (also through pickle) and gives the same result without the decoder.
    state = pickle.loads(pickle.dumps(segmenter.get_state()))
    assert set(state) == {"foreground", "center_distances", "boundary_distances"}
    other, _ = _segmenter(labels, np.zeros_like(maps))
    other.set_state(state)
    np.testing.assert_array_equal(other.generate(), seg)
    other.clear_state()
    assert not other.is_initialized
    with pytest.raises(ValueError, match="missing"):
        other.set_state({"foreground": maps[0]})

    # Writing into a pre-allocated output.
    out = np.zeros(labels.shape, dtype="uint32")
    assert segmenter.generate(segmentation=out) is out
    np.testing.assert_array_equal(out, seg)

    # Embeddings of another image are rejected with a clear message.
    _, wrong = make_stub_predictor(labels[:100], img_size=256)
    with pytest.raises(ValueError, match="shape"):
        segmenter.initialize(image, image_embeddings=wrong)


def test_ais_empty_image_gives_empty_labels():
    labels = np.zeros((64, 80), dtype="uint32")
    maps = np.stack(decoder_targets(labels))
    segmenter, embeddings = _segmenter(labels, maps)
    segmenter.initialize(np.zeros((64, 80), dtype="uint8"), image_embeddings=embeddings)
    seg = segmenter.generate()
    assert seg.shape == (64, 80) and seg.max() == 0
    assert segmenter.generate(output_mode="binary_mask") == []


def test_decoder_must_fit_the_encoder(cells):
    _, labels, maps = cells
    predictor, _ = make_stub_predictor(labels, img_size=256)
    with pytest.raises(ValueError, match="input size 1024"):
        InstanceSegmentationWithDecoder(predictor, StubDecoder(maps, encoder_img_size=1024))
    with pytest.raises(ValueError, match="decoder"):
        InstanceSegmentationWithDecoder(predictor, None)
    with pytest.raises(ValueError, match="needs a decoder"):
        get_instance_segmentation_generator(predictor, is_tiled=False, segmentation_mode="ais")
    with pytest.raises(ValueError, match="Invalid segmentation_mode"):
        get_instance_segmentation_generator(predictor, is_tiled=False, segmentation_mode="sam")


@pytest.mark.parametrize("tile_shape,halo", [((96, 112), (16, 24)), ((64, 64), (8, 8))])
def test_tiled_and_untiled_ais_agree(cells, tile_shape, halo):
    image, labels, maps = cells
    untiled, embeddings = _segmenter(labels, maps)
    untiled.initialize(image, image_embeddings=embeddings)
    expected = untiled.generate()

    predictor, _ = make_stub_predictor(labels, img_size=256)
    decoder = StubDecoder(maps, tiling=(tile_shape, halo))
    tiled = get_instance_segmentation_generator(predictor, is_tiled=True, decoder=decoder)
    assert isinstance(tiled, TiledInstanceSegmentationWithDecoder)
    tiled_embeddings = tiled_embeddings_with_ids(labels.shape, tile_shape, halo, img_size=256)
    tiled.initialize(image, image_embeddings=tiled_embeddings)
    n_tiles = int(np.ceil(labels.shape[0] / tile_shape[0]) * np.ceil(labels.shape[1] / tile_shape[1]))
    assert decoder.calls == n_tiles > 1
    for key, value in tiled.get_state().items():
        np.testing.assert_array_equal(value, untiled.get_state()[key], err_msg=key)
    np.testing.assert_array_equal(tiled.generate(), expected)

    with pytest.raises(ValueError, match="tile_shape"):
        tiled.initialize(image, image_embeddings=tiled_embeddings, tile_shape=(50, 50))
    with pytest.raises(ValueError, match="not tiled"):
        tiled.initialize(image, image_embeddings=embeddings)
    with pytest.raises(ValueError, match="tiled"):
        untiled.initialize(image, image_embeddings=tiled_embeddings)


@pytest.mark.parametrize("value,channels", [(0, None), (7, None), (1000, 3), (0.25, None)])
def test_ais_image_without_contrast_gives_no_objects_without_running_the_decoder(cells, value, channels):
    _, labels, maps = cells  # the stub decoder would report the objects of `labels` wherever it is run
    segmenter, embeddings = _segmenter(labels, maps)
    image = np.full(labels.shape if channels is None else labels.shape + (channels,), value)
    segmenter.initialize(image, image_embeddings=embeddings)
    assert segmenter._decoder.calls == 0
    assert segmenter.generate().max() == 0 and segmenter.generate(output_mode="binary_mask") == []
    state = segmenter.get_state()
    assert state["foreground"].max() == 0 and state["center_distances"].min() == 1
    # a single different pixel is a hot pixel, not an object: still no objects
    image = image.copy()
    image[5, 5] = value + 1
    segmenter.initialize(image, image_embeddings=embeddings)
    assert segmenter._decoder.calls == 0 and segmenter.generate().max() == 0
    # a 6 x 6 square: the decoder runs (and finds its objects)
    image[5:11, 5:11] = value + 1
    segmenter.initialize(image, image_embeddings=embeddings)
    assert segmenter._decoder.calls == 1 and segmenter.generate().max() == labels.max()


@pytest.mark.parametrize("kind", ["gaussian", "poisson", "camera_uint16"])
def test_ais_pure_noise_gives_no_objects_without_running_the_decoder(cells, kind):
    image, labels, maps = cells
    segmenter, embeddings = _segmenter(labels, maps)
    rng = np.random.default_rng(3)
    noise = {"gaussian": lambda: rng.normal(0.4, 0.05, labels.shape).astype("float32"),
             "poisson": lambda: rng.poisson(3, labels.shape).astype("uint8"),
             "camera_uint16": lambda: (100 + rng.poisson(20, labels.shape) + rng.normal(0, 2, labels.shape)
                                       ).astype("uint16")}[kind]()
    segmenter.initialize(noise, image_embeddings=embeddings)
    assert segmenter._decoder.calls == 0 and segmenter.generate().max() == 0
    # the cells under the same noise (contrast 4 times its mean level): the decoder runs
    scaled = image.astype("float32") / image.max() * 4 * float(noise.mean()) + noise
    segmenter.initialize(scaled.astype(noise.dtype), image_embeddings=embeddings)
    assert segmenter._decoder.calls == 1 and segmenter.generate().max() == labels.max()


@pytest.mark.parametrize("fill", ["constant", "noise"])
def test_tiled_ais_skips_tiles_without_contrast(cells, fill):
    image, labels, maps = cells
    tile_shape, halo = (64, 64), (8, 8)
    flat = image.copy()
    # the right half is constant or noise: tiles whose outer block lies there see nothing
    rng = np.random.default_rng(0)
    flat[:, 130:] = 5 if fill == "constant" else rng.poisson(5, flat[:, 130:].shape).astype(flat.dtype)
    predictor, _ = make_stub_predictor(labels, img_size=256)
    decoder = StubDecoder(maps, tiling=(tile_shape, halo))
    tiled = get_instance_segmentation_generator(predictor, is_tiled=True, decoder=decoder)
    tiled.initialize(flat, image_embeddings=tiled_embeddings_with_ids(labels.shape, tile_shape, halo, img_size=256))
    from micro_sam import _tiling

    tiles = list(_tiling.iterate_tiles(labels.shape, tile_shape, halo))
    with_contrast = [t for t in tiles if t.outer[1].start < 130]
    assert 0 < decoder.calls == len(with_contrast) < len(tiles)
    processed = np.zeros(labels.shape, dtype=bool)
    for tile in with_contrast:
        processed[tile.inner] = True
    seg = tiled.generate()
    assert not processed.all() and seg[~processed].max() == 0 and seg[:, :120].max() > 0
