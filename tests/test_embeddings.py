"""Image embeddings: equality with segment_anything, 2D/3D/tiled caching in micro_sam's layout, resume."""
import warnings

import numpy as np
import pytest
import torch
import zarr

from micro_sam import _embeddings
from micro_sam._image import to_image
from micro_sam.util import precompute_image_embeddings, set_precomputed


def _reference_features(predictor, image):
    """What segment_anything's own predictor computes for the normalised image."""
    predictor.reset_image()
    predictor.set_image(to_image(image))
    return predictor.get_image_embedding().cpu().numpy()


def test_vit_t_embedding_equals_segment_anything(vit_t_predictor, rng):
    image = rng.integers(0, 4000, size=(300, 410)).astype("uint16")
    embeddings = precompute_image_embeddings(vit_t_predictor, image, verbose=False)
    assert embeddings["features"].shape == (1, 256, 64, 64)
    assert embeddings["original_size"] == (300, 410) and embeddings["input_size"] == (749, 1024)
    np.testing.assert_allclose(embeddings["features"], _reference_features(vit_t_predictor, image), atol=1e-4, rtol=0)


def test_vit_b_embedding_equals_segment_anything(tmp_path, rng):
    from segment_anything import SamPredictor, sam_model_registry

    from micro_sam.util import get_sam_model

    torch.manual_seed(1)
    sam = sam_model_registry["vit_b"]().eval()
    path = tmp_path / "vit_b.pt"
    torch.save(sam.state_dict(), path)
    image = rng.random((256, 256, 3)).astype("float32")
    reference = SamPredictor(sam)
    reference.set_image(to_image(image))
    expected = reference.get_image_embedding().numpy()
    del reference, sam
    predictor = get_sam_model(model_type="vit_b", checkpoint_path=path, device="cpu")
    features = precompute_image_embeddings(predictor, image, verbose=False)["features"]
    assert np.abs(features - expected).max() <= 1e-4


def test_normalisation_per_channel():
    image = np.stack([np.full((4, 4), 10), np.arange(16).reshape(4, 4)], axis=-1).astype("uint16")
    out = to_image(image)
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert (out[..., 0] == 0).all()  # constant channel -> 0
    # values 0..15 map to multiples of 17 (float32: 15 / (15 + 1e-7) == 1), as in micro_sam
    np.testing.assert_array_equal(out[..., 1].ravel(), np.arange(16) * 17)
    assert (out[..., 2] == 0).all()  # the added third channel
    grey = to_image(np.array([[0.0, 0.5], [1.0, 0.25]]))
    assert (grey[..., 0] == grey[..., 2]).all()
    np.testing.assert_array_equal(grey[..., 0], [[0, 127], [254, 63]])  # float64 keeps the 1e-7
    with pytest.warns(UserWarning, match="5 channels"):
        assert to_image(np.zeros((8, 8, 5))).shape == (8, 8, 3)


_ENCODE = _embeddings.encode_images


def _count_encoder_calls(monkeypatch, fail_after=None):
    calls = []
    original = _ENCODE

    def counting(predictor, images):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(len(images))
        return original(predictor, images)

    monkeypatch.setattr(_embeddings, "encode_images", counting)
    return calls


def test_2d_cache_roundtrip_and_layout(tiny_predictor, tmp_path, rng, monkeypatch):
    image = rng.integers(0, 255, size=(128, 96)).astype("uint8")
    path = tmp_path / "emb.zarr"
    first = precompute_image_embeddings(tiny_predictor, image, save_path=path, verbose=False)
    f = zarr.open_group(str(path), mode="r")
    assert f["features"].shape == (1, 256, 64, 64)
    attrs = dict(f.attrs)
    for key in ("data_signature", "tile_shape", "halo", "model_type", "model_name", "model_hash",
                "micro_sam_version", "input_size", "original_size"):
        assert key in attrs
    assert attrs["original_size"] == [128, 96] and attrs["tile_shape"] is None
    calls = _count_encoder_calls(monkeypatch)
    second = precompute_image_embeddings(tiny_predictor, image, save_path=path, verbose=False)
    assert calls == []
    np.testing.assert_array_equal(first["features"], second["features"])
    assert tuple(second["input_size"]) == tuple(first["input_size"])


def test_cache_mismatch_raises_and_keeps_data(tiny_predictor, tmp_path, rng):
    from conftest import make_tiny_predictor

    image = rng.integers(0, 255, size=(64, 64)).astype("uint8")
    path = tmp_path / "emb.zarr"
    saved = precompute_image_embeddings(tiny_predictor, image, save_path=path, verbose=False)["features"]
    with pytest.raises(RuntimeError, match="image data"):
        precompute_image_embeddings(tiny_predictor, image + 1, save_path=path, verbose=False)
    other_model = make_tiny_predictor(seed=1, model_hash="xxh128:other")
    with pytest.raises(RuntimeError, match="model_hash"):
        precompute_image_embeddings(other_model, image, save_path=path, verbose=False)
    other_type = make_tiny_predictor(model_type="vit_t")
    with pytest.raises(RuntimeError, match="model_type"):
        precompute_image_embeddings(other_type, image, save_path=path, verbose=False)
    with pytest.raises(RuntimeError, match="tile_shape"):
        precompute_image_embeddings(tiny_predictor, image, save_path=path, tile_shape=(32, 32), halo=(8, 8),
                                    verbose=False)
    np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["features"][...], saved)


def test_3d_cache_roundtrip_and_resume(tiny_predictor, tmp_path, rng, monkeypatch):
    volume = rng.integers(0, 1000, size=(8, 64, 80)).astype("uint16")
    reference = precompute_image_embeddings(tiny_predictor, volume, verbose=False, batch_size=3)
    assert reference["features"].shape == (8, 1, 256, 64, 64)
    for z in (0, 7):
        np.testing.assert_allclose(reference["features"][z], _reference_features(tiny_predictor, volume[z]),
                                   atol=1e-5)

    path = tmp_path / "vol.zarr"
    _count_encoder_calls(monkeypatch, fail_after=2)  # interrupted after 2 batches of 2 slices
    with pytest.raises(KeyboardInterrupt):
        precompute_image_embeddings(tiny_predictor, volume, save_path=path, verbose=False, batch_size=2)
    assert "input_size" not in zarr.open_group(str(path), mode="r").attrs
    calls = _count_encoder_calls(monkeypatch)
    resumed = precompute_image_embeddings(tiny_predictor, volume, save_path=path, verbose=False, batch_size=2)
    assert sum(calls) == 4  # only the 4 missing slices
    np.testing.assert_allclose(resumed["features"], reference["features"], atol=1e-5)
    calls.clear()
    lazy = precompute_image_embeddings(tiny_predictor, volume, save_path=path, lazy_loading=True, verbose=False)
    assert calls == [] and isinstance(lazy["features"], zarr.Array)
    set_precomputed(tiny_predictor, lazy, i=5)
    np.testing.assert_allclose(tiny_predictor.features.numpy(), reference["features"][5], atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        set_precomputed(tiny_predictor, lazy, i=8)
    with pytest.raises(ValueError, match="slice index"):
        set_precomputed(tiny_predictor, lazy)


def test_tiled_2048_cache_roundtrip_and_resume(tiny_predictor, tmp_path, rng, monkeypatch):
    image = rng.integers(0, 255, size=(2048, 2048)).astype("uint8")
    tile_shape, halo = (1024, 1024), (128, 128)
    path = tmp_path / "tiled.zarr"
    _count_encoder_calls(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        precompute_image_embeddings(tiny_predictor, image, save_path=path, tile_shape=tile_shape, halo=halo,
                                    verbose=False)
    calls = _count_encoder_calls(monkeypatch)
    embeddings = precompute_image_embeddings(tiny_predictor, image, save_path=path, tile_shape=tile_shape,
                                             halo=halo, verbose=False)
    assert sum(calls) == 2  # tiles 2 and 3
    f = zarr.open_group(str(path), mode="r")
    assert sorted(f["features"].keys()) == ["0", "1", "2", "3"]
    assert f.attrs["tile_shape"] == [1024, 1024] and f.attrs["halo"] == [128, 128]
    assert f["features"].attrs["shape"] == [2048, 2048]
    # tile 3 is the bottom right tile; its outer block is [896:2048, 896:2048]
    assert f["features"]["3"].attrs["original_size"] == [1152, 1152]
    expected = _reference_features(tiny_predictor, image[896:, 896:])
    np.testing.assert_allclose(f["features"]["3"][...], expected, atol=1e-5)
    set_precomputed(tiny_predictor, embeddings, tile_id=3)
    assert tiny_predictor.original_size == (1152, 1152)
    calls.clear()
    precompute_image_embeddings(tiny_predictor, image, save_path=path, tile_shape=tile_shape, halo=halo,
                                verbose=False)
    assert calls == []


def test_tiled_3d_and_mask(tiny_predictor, rng):
    volume = rng.integers(0, 255, size=(2, 300, 300)).astype("uint8")
    mask = np.zeros(volume.shape, dtype=bool)
    mask[0, :100, :100] = True  # only tile 0 of slice 0 (outer block reaches 150 + halo)
    embeddings = precompute_image_embeddings(tiny_predictor, volume, tile_shape=(150, 150), halo=(20, 20),
                                             mask=mask, verbose=False)
    features = embeddings["features"]
    assert sorted(features.keys()) == ["0"]
    assert features["0"].shape == (2, 1, 256, 64, 64)
    set_precomputed(tiny_predictor, embeddings, i=0, tile_id=0)
    with pytest.raises(ValueError, match="No embeddings"):
        set_precomputed(tiny_predictor, embeddings, i=1, tile_id=0)
    with pytest.raises(ValueError, match="No embeddings for tile 1"):
        set_precomputed(tiny_predictor, embeddings, i=0, tile_id=1)


def test_progress_callbacks(tiny_predictor, rng, capsys):
    volume = rng.integers(0, 255, size=(3, 32, 32)).astype("uint8")
    seen = []
    precompute_image_embeddings(tiny_predictor, volume, pbar_init=lambda total, desc: seen.append(("init", total)),
                                pbar_update=lambda n: seen.append(("update", n)))
    assert seen[0] == ("init", 3) and sum(n for kind, n in seen if kind == "update") == 3
    precompute_image_embeddings(tiny_predictor, volume, verbose=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad, kwargs, message", [
    (np.zeros((0, 10)), {}, "empty"),
    (np.zeros(10), {}, "shape"),
    (np.zeros((2, 3, 4, 5, 6)), {}, "shape"),
    (np.full((10, 10), np.nan), {}, "NaN"),
    (np.zeros((10, 10, 3, 4)), {"ndim": 2}, "ndim=2"),
    (np.zeros((20, 64, 64)), {"ndim": 2}, "3D volume"),
    (np.zeros((64, 64)), {"tile_shape": (128, 32), "halo": (8, 8)}, "larger than the image"),
    (np.zeros((64, 64)), {"tile_shape": (32, 32), "halo": (16, 8)}, "half"),
    (np.zeros((64, 64)), {"batch_size": 0}, "batch_size"),
])
def test_bad_input(tiny_predictor, bad, kwargs, message):
    with pytest.raises(ValueError, match=message):
        precompute_image_embeddings(tiny_predictor, bad, verbose=False, **kwargs)


def _damage_chunk(path, chunk):
    """Overwrite one chunk file of a cache with garbage, as a full disk or an interrupted copy leaves it."""
    chunk_file = path.joinpath("features", "c", *(str(c) for c in chunk))
    assert chunk_file.is_file()
    chunk_file.write_bytes(b"\x00garbage" * 64)


def test_damaged_2d_cache_is_recomputed_with_a_warning(tiny_predictor, tmp_path, rng, monkeypatch):
    image = rng.integers(0, 255, size=(64, 80)).astype("uint8")
    path = tmp_path / "emb.zarr"
    first = precompute_image_embeddings(tiny_predictor, image, save_path=path, verbose=False)["features"]
    _damage_chunk(path, (0, 0, 0, 0))
    calls = _count_encoder_calls(monkeypatch)
    with pytest.warns(UserWarning, match=r"emb\.zarr' is damaged .*computed again"):
        again = precompute_image_embeddings(tiny_predictor, image, save_path=path, verbose=False)
    assert calls == [1]
    np.testing.assert_allclose(again["features"], first, atol=1e-6)
    calls.clear()  # repaired: read without recomputation or warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(
            precompute_image_embeddings(tiny_predictor, image, save_path=path, verbose=False)["features"],
            again["features"])
    assert calls == []


def test_damaged_3d_cache_recomputes_only_the_damaged_slice(tiny_predictor, tmp_path, rng, monkeypatch):
    volume = rng.integers(0, 255, size=(3, 40, 40)).astype("uint8")
    path = tmp_path / "vol.zarr"
    first = precompute_image_embeddings(tiny_predictor, volume, save_path=path, verbose=False)["features"]
    _damage_chunk(path, (1, 0, 0, 0, 0))
    lazy = precompute_image_embeddings(tiny_predictor, volume, save_path=path, lazy_loading=True, verbose=False)
    with pytest.raises(RuntimeError, match=r"vol\.zarr' is damaged: the embeddings of slice 1 cannot be read.*"
                                           r"Delete the cache folder"):
        set_precomputed(tiny_predictor, lazy, i=1)
    calls = _count_encoder_calls(monkeypatch)
    with pytest.warns(UserWarning, match="is damaged"):
        again = precompute_image_embeddings(tiny_predictor, volume, save_path=path, verbose=False)
    assert calls == [1]  # slice 1 only
    np.testing.assert_allclose(again["features"], first, atol=1e-6)


def test_damaged_tiled_cache_names_the_cache(tiny_predictor, tmp_path, rng):
    image = rng.integers(0, 255, size=(96, 96)).astype("uint8")
    path = tmp_path / "tiled.zarr"
    embeddings = precompute_image_embeddings(tiny_predictor, image, save_path=path, tile_shape=(48, 48),
                                             halo=(8, 8), verbose=False)
    tile = path / "features" / "2"
    (tile / "c" / "0" / "0" / "0" / "0").write_bytes(b"\x00garbage" * 64)
    with pytest.raises(RuntimeError, match=r"tiled\.zarr' is damaged: the embeddings of tile 2"):
        set_precomputed(tiny_predictor, embeddings, tile_id=2)
