"""precompute_state: cached embeddings and automatic segmentation states; the micro_sam.precompute_embeddings CLI."""
import numpy as np
import pytest
import tifffile

from micro_sam import util
from micro_sam.precompute_state import cache_amg_state, cache_is_state, main, precompute_state

from instance_segmentation._models import StubDecoder, make_stub_predictor
from instance_segmentation._targets import decoder_targets
from instance_segmentation.test_amg import _disks


@pytest.fixture(scope="module")
def scene():
    labels = _disks((96, 128), 6, (10, 14), seed=1)
    return labels, (labels > 0).astype("float32")


def test_cache_amg_state(scene, tmp_path):
    labels, image = scene
    predictor, _ = make_stub_predictor(labels, img_size=256)
    save_path = tmp_path / "emb.zarr"
    embeddings = util.precompute_image_embeddings(predictor, image, save_path=save_path, verbose=False)

    amg = cache_amg_state(predictor, image, embeddings, save_path, verbose=False, points_per_side=8)
    n_calls = len(predictor.model.hits)
    assert n_calls == 64
    expected = amg.generate()
    assert expected.max() == labels.max()

    # Loaded from the cache: no mask decoder calls, same result.
    loaded = cache_amg_state(predictor, image, embeddings, save_path, verbose=False, points_per_side=8)
    assert len(predictor.model.hits) == n_calls
    np.testing.assert_array_equal(loaded.generate(), expected)
    np.testing.assert_array_equal(loaded.generate(output_mode="binary_mask")[0]["segmentation"],
                                  amg.generate(output_mode="binary_mask")[0]["segmentation"])
    # Other generator parameters: recomputed (and re-cached).
    cache_amg_state(predictor, image, embeddings, save_path, verbose=False, points_per_side=4)
    assert len(predictor.model.hits) == n_calls + 16
    # The embeddings cache itself is still valid.
    again = util.precompute_image_embeddings(predictor, image, save_path=save_path, verbose=False)
    np.testing.assert_array_equal(np.asarray(again["features"]), np.asarray(embeddings["features"]))


def test_cache_is_state_per_slice(scene, tmp_path):
    labels, image = scene
    volume = np.stack([image, image[::-1]])
    label_volume = np.stack([labels, labels[::-1]])
    maps = np.stack([np.stack(decoder_targets(s)) for s in label_volume], axis=1)
    predictor, _ = make_stub_predictor(labels, img_size=1024)
    decoder = StubDecoder(maps, by_slice="calls")
    save_path = tmp_path / "emb.zarr"
    embeddings = util.precompute_image_embeddings(predictor, volume, save_path=save_path, ndim=3, verbose=False)
    results = []
    for i in range(2):
        segmenter = cache_is_state(predictor, decoder, volume, embeddings, save_path, verbose=False, i=i)
        results.append(segmenter.generate(foreground_smoothing=0))
    assert decoder.calls == 2
    np.testing.assert_array_equal(results[0] > 0, labels > 0)
    np.testing.assert_array_equal(results[1] > 0, labels[::-1] > 0)
    for i in range(2):
        segmenter = cache_is_state(predictor, decoder, volume, embeddings, save_path, verbose=False, i=i)
        np.testing.assert_array_equal(segmenter.generate(foreground_smoothing=0), results[i])
        assert cache_is_state(predictor, decoder, volume, embeddings, save_path, verbose=False, i=i,
                              skip_load=True) is None
    assert decoder.calls == 2


def test_precompute_cli(vit_t_checkpoint, tmp_path, capsys):
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.random.default_rng(0).integers(0, 255, (40, 56), dtype="uint8"))
    assert main(["-i", str(image), "-e", str(tmp_path / "emb"), "-m", "vit_t", "-c", str(vit_t_checkpoint),
                 "-d", "cpu"]) == 0
    assert (tmp_path / "emb.zarr" / "zarr.json").exists()
    import zarr

    cache = zarr.open_group(tmp_path / "emb.zarr", mode="r")
    assert tuple(cache.attrs["original_size"]) == (40, 56) and cache["features"].shape == (1, 256, 64, 64)

    assert main(["-i", str(tmp_path / "missing.tif"), "-e", str(tmp_path / "x"), "-m", "vit_t",
                 "-c", str(vit_t_checkpoint), "-d", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--precompute_amg_state" in capsys.readouterr().out


@pytest.mark.slow
def test_precompute_state_folder_with_amg_state(vit_t_checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", np.random.default_rng(1).integers(0, 255, (40, 56), dtype="uint8"))
    folder.joinpath("notes.txt").write_text("not matched by the pattern")
    precompute_state(folder, tmp_path / "out", pattern="*.tif", model_type="vit_t",
                     checkpoint_path=vit_t_checkpoint, precompute_amg_state=True, device="cpu")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.zarr"]
    assert (tmp_path / "out" / "a.zarr" / "amg_state" / "state").is_dir()
