"""automatic_instance_segmentation / get_predictor_and_segmenter and the micro_sam.automatic_segmentation CLI."""
import os

import numpy as np
import pytest
import tifffile
import torch

from micro_sam.automatic_segmentation import (
    automatic_instance_segmentation, get_predictor_and_segmenter, main,
)
from micro_sam.instance_segmentation import (
    AutomaticMaskGenerator, InstanceSegmentationWithDecoder, TiledAutomaticMaskGenerator,
)

from instance_segmentation._models import StubDecoder, make_stub_predictor
from instance_segmentation._targets import decoder_targets
from instance_segmentation.test_postprocessing import _matched_ious


@pytest.fixture(scope="module")
def nuclei():
    from micro_sam.sample_data import synthetic_nuclei_2d

    image, labels = synthetic_nuclei_2d(shape=(128, 160), seed=1)
    return image, labels, np.stack(decoder_targets(labels))


def _ais(labels, maps, img_size=256, **kwargs):
    predictor, _ = make_stub_predictor(labels, img_size=img_size)
    decoder = StubDecoder(maps, **kwargs)
    return predictor, InstanceSegmentationWithDecoder(predictor, decoder), decoder


def test_get_predictor_and_segmenter_choices(nuclei):
    _, labels, _ = nuclei
    predictor, _ = make_stub_predictor(labels, img_size=256)
    _, segmenter = get_predictor_and_segmenter("vit_b", predictor=predictor, state={}, points_per_side=4)
    assert isinstance(segmenter, AutomaticMaskGenerator)
    _, tiled = get_predictor_and_segmenter("vit_b", predictor=predictor, state={}, is_tiled=True)
    assert isinstance(tiled, TiledAutomaticMaskGenerator)
    with pytest.raises(ValueError, match="needs an instance segmentation decoder"):
        get_predictor_and_segmenter("vit_b", predictor=predictor, state={}, segmentation_mode="ais")
    with pytest.raises(ValueError, match="state"):
        get_predictor_and_segmenter("vit_b", predictor=predictor)


def test_segment_array_and_write(nuclei, tmp_path, capsys):
    image, labels, maps = nuclei
    predictor, segmenter, decoder = _ais(labels, maps)
    out = tmp_path / "out" / "labels"  # ".tif" is added, the folder is created
    seg = automatic_instance_segmentation(predictor, segmenter, image, output_path=out, verbose=False,
                                          foreground_smoothing=0)
    ious, one_to_one = _matched_ious(seg, labels)
    assert one_to_one and ious.min() > 0.9 and seg.max() == labels.max()
    written = tmp_path / "out" / "labels.tif"
    np.testing.assert_array_equal(tifffile.imread(written), seg)
    assert sorted(os.listdir(tmp_path / "out")) == ["labels.tif"]  # no temporary files left
    assert decoder.calls == 1

    # An existing output is not recomputed (and said so), unless overwrite=True.
    again = automatic_instance_segmentation(predictor, segmenter, image, output_path=written, verbose=False)
    assert "exists already" in capsys.readouterr().out
    assert decoder.calls == 1
    np.testing.assert_array_equal(again, seg)
    automatic_instance_segmentation(predictor, segmenter, image, output_path=written, verbose=False,
                                    overwrite=True, min_size=10 ** 6)
    assert decoder.calls == 2 and tifffile.imread(written).max() == 0


def test_segment_file_with_embedding_cache(nuclei, tmp_path):
    import imageio.v3 as imageio

    image, labels, maps = nuclei
    path = tmp_path / "image.tif"
    imageio.imwrite(path, image)
    predictor, segmenter, _ = _ais(labels, maps)
    seg, embeddings = automatic_instance_segmentation(
        predictor, segmenter, path, embedding_path=tmp_path / "emb.zarr", verbose=False, return_embeddings=True)
    assert (tmp_path / "emb.zarr").exists() and tuple(embeddings["original_size"]) == labels.shape
    assert seg.max() == labels.max()


def test_bad_inputs(nuclei, tmp_path):
    image, labels, maps = nuclei
    predictor, segmenter, _ = _ais(labels, maps)
    with pytest.raises(ValueError, match="does not exist"):
        automatic_instance_segmentation(predictor, segmenter, tmp_path / "missing.tif", verbose=False)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="Could not read"):
        automatic_instance_segmentation(predictor, segmenter, broken, verbose=False)
    volume = np.stack([image] * 20)
    with pytest.raises(ValueError, match="ndim=2"):
        automatic_instance_segmentation(predictor, segmenter, volume, ndim=2, verbose=False)
    with pytest.raises(ValueError, match="not tiled"):
        automatic_instance_segmentation(predictor, segmenter, image, tile_shape=(64, 64), halo=(8, 8),
                                        verbose=False)
    with pytest.raises(ValueError, match="annotator"):
        automatic_instance_segmentation(predictor, segmenter, image, annotate=True, verbose=False)


def test_segment_volume(tmp_path):
    """Per-slice AIS merged into 3D: objects that continue over slices become single 3D objects."""
    from skimage.draw import disk

    labels = np.zeros((4, 64, 80), dtype="uint32")
    for k, (center, z0, z1) in enumerate([((20, 20), 0, 4), ((40, 55), 1, 3), ((45, 20), 0, 2)], start=1):
        rr, cc = disk(center, 9, shape=labels.shape[1:])
        labels[z0:z1, rr, cc] = k
    maps = np.stack([np.stack(decoder_targets(s)) for s in labels], axis=1)  # (3, Z, Y, X)
    # (3D embeddings need the 1024 input size of the real models.)
    predictor, segmenter, decoder = _ais(labels[0], maps, img_size=1024, by_slice="calls")
    seg = automatic_instance_segmentation(predictor, segmenter, labels.astype("float32"), ndim=3, verbose=False,
                                          foreground_smoothing=0)
    assert decoder.calls == 4 and seg.shape == labels.shape
    assert seg.max() == 3
    for k in (1, 2, 3):
        ids = np.unique(seg[labels == k])
        assert len(ids) == 1 and ids[0] != 0
        assert (seg == ids[0]).sum() >= 0.95 * (labels == k).sum()


# --- command line ---------------------------------------------------------------------------------------------
def test_cli_help(capsys):
    with pytest.raises(SystemExit) as error:
        main(["--help"])
    assert error.value.code == 0
    text = capsys.readouterr().out
    for option in ("--input_path", "--output_path", "--embedding_path", "--overwrite", "--overlay", "--tile_shape",
                   "--mode", "--pattern", "center_distance_threshold", "pred_iou_thresh"):
        assert option in text


def _cli_images(folder, names):
    import imageio.v3 as imageio

    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    for name in names:
        imageio.imwrite(folder / f"{name}.png", rng.integers(0, 255, (48, 64), dtype="uint8"))


def _cli_args(checkpoint):
    return ["-m", "vit_t", "-c", str(checkpoint), "-d", "cpu", "--points_per_side", "2",
            "--pred_iou_thresh", "0", "--stability_score_thresh", "0"]


def test_cli_single_image(vit_t_checkpoint, tmp_path, capsys):
    import imageio.v3 as imageio

    _cli_images(tmp_path / "images", ["a"])
    out = tmp_path / "single.tif"
    assert main(["-i", str(tmp_path / "images" / "a.png"), "-o", str(out), "-e", str(tmp_path / "a.zarr"),
                 "--overlay"] + _cli_args(vit_t_checkpoint)) == 0
    labels = tifffile.imread(out)
    assert labels.shape == (48, 64) and labels.dtype == np.uint32
    assert imageio.imread(tmp_path / "single_overlay.png").shape == (48, 64, 3)
    assert (tmp_path / "a.zarr" / "zarr.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["a.zarr", "images", "single.tif", "single_overlay.png"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("single.tif", "single_overlay.png"):  # ordinary permissions, not those of a temporary file
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask

    # An existing output is skipped with a message (without loading the model).
    mtime = os.path.getmtime(out)
    capsys.readouterr()
    assert main(["-i", str(tmp_path / "images" / "a.png"), "-o", str(out)] + _cli_args(vit_t_checkpoint)) == 0
    assert "Skipping" in capsys.readouterr().out and os.path.getmtime(out) == mtime


def test_cli_folder(vit_t_checkpoint, tmp_path, capsys):
    _cli_images(tmp_path / "images", ["a", "b"])
    out = tmp_path / "labels"
    out.mkdir()
    tifffile.imwrite(out / "a.tif", np.full((48, 64), 7, dtype="uint32"))  # exists: skipped
    assert main(["-i", str(tmp_path / "images"), "-o", str(out), "-e", str(tmp_path / "embeddings")]
                + _cli_args(vit_t_checkpoint)) == 0
    assert "Skipping" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["a.tif", "b.tif"]
    assert tifffile.imread(out / "a.tif").max() == 7
    assert tifffile.imread(out / "b.tif").shape == (48, 64)
    assert sorted(os.listdir(tmp_path / "embeddings")) == ["b.zarr"]


def test_cli_errors(vit_t_checkpoint, tmp_path, capsys):
    assert main(["-i", str(tmp_path / "missing.tif"), "-o", str(tmp_path / "out.tif")]) == 2
    assert "does not exist" in capsys.readouterr().err
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.zeros((32, 32), dtype="uint8"))
    assert main(["-i", str(image), "-o", str(tmp_path / "out.tif"), "-m", "vit_t", "-c", str(vit_t_checkpoint),
                 "-d", "cpu", "--no_such_parameter", "1"]) == 2
    assert "unknown parameter" in capsys.readouterr().err
    assert main(["-i", str(image), "-o", str(tmp_path / "out.tif"), "--tile_shape", "16", "16"]) == 2
    assert "--halo" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_ais_with_exported_model(tmp_path):
    """A vit_t model with a (random) decoder in the exported {model_state, decoder_state} format runs AIS."""
    from micro_sam.instance_segmentation import get_unetr
    from micro_sam.models.build_sam import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"]()
    unetr = get_unetr(sam.image_encoder, device="cpu")
    decoder_state = {k: v for k, v in unetr.state_dict().items() if not k.startswith("encoder.")}
    checkpoint = tmp_path / "vit_t_ais.pt"
    torch.save({"model_state": sam.state_dict(), "decoder_state": decoder_state}, checkpoint)
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.random.default_rng(0).integers(0, 255, (64, 80), dtype="uint8"))
    out = tmp_path / "labels.tif"
    assert main(["-i", str(image), "-o", str(out), "-m", "vit_t", "-c", str(checkpoint), "-d", "cpu",
                 "--center_distance_threshold", "0.6"]) == 0
    assert tifffile.imread(out).shape == (64, 80)


def test_automatic_tracking_delegates_to_tracker(monkeypatch):
    """Frames are segmented one by one and handed to multi_dimensional_segmentation.track_across_frames."""
    from micro_sam import multi_dimensional_segmentation as mds
    from micro_sam.automatic_segmentation import automatic_tracking
    from skimage.draw import disk

    labels = np.zeros((3, 48, 48), dtype="uint32")
    for t in range(3):
        labels[t][disk((20, 14 + 4 * t), 8, shape=(48, 48))] = 1
    maps = np.stack([np.stack(decoder_targets(s)) for s in labels], axis=1)
    predictor, segmenter, _ = _ais(labels[0], maps, img_size=1024, by_slice="calls")
    calls = {}

    def fake_tracking(timeseries, segmentation, gap_closing=None, min_time_extent=None, mode="greedy",
                      tracking_model="general_2d", verbose=True, pbar_init=None, pbar_update=None,
                      output_folder=None):
        calls.update(segmentation=segmentation.copy(), min_time_extent=min_time_extent, mode=mode)
        return (segmentation > 0).astype("uint32"), [{1: []}]

    monkeypatch.setattr(mds, "track_across_frames", fake_tracking)
    tracks, lineages = automatic_tracking(predictor, segmenter, labels.astype("float32"), verbose=False,
                                          min_time_extent=2, mode="greedy_nodiv", foreground_smoothing=0)
    assert lineages == [{1: []}] and calls["min_time_extent"] == 2 and calls["mode"] == "greedy_nodiv"
    per_frame = calls["segmentation"]
    np.testing.assert_array_equal(per_frame > 0, labels > 0)
    assert len(np.unique(per_frame)) == 4  # one object per frame, ids unique over frames
    np.testing.assert_array_equal(tracks, (labels > 0).astype("uint32"))


def test_label_dtype_is_uint32_in_2d_tiled_3d_and_tracking(tmp_path):
    """One label dtype for every result: 2D, tiled 2D, 3D (after the merge), written files, tracking."""
    from skimage.draw import disk

    from micro_sam.instance_segmentation import TiledInstanceSegmentationWithDecoder
    from micro_sam.multi_dimensional_segmentation import _recolor, merge_instance_segmentation_3d

    from instance_segmentation._models import tiled_embeddings_with_ids

    labels = np.zeros((2, 64, 64), dtype="uint32")
    for k, center in enumerate([(20, 20), (44, 40)], start=1):
        labels[:, disk(center, 9, shape=(64, 64))[0], disk(center, 9, shape=(64, 64))[1]] = k
    maps = np.stack([np.stack(decoder_targets(s)) for s in labels], axis=1)

    predictor, segmenter, _ = _ais(labels[0], maps[:, 0], img_size=1024)
    seg2d = automatic_instance_segmentation(predictor, segmenter, labels[0].astype("float32"), verbose=False,
                                            output_path=tmp_path / "2d.tif", foreground_smoothing=0)
    tiling = ((32, 32), (8, 8))
    tiled = TiledInstanceSegmentationWithDecoder(predictor, StubDecoder(maps[:, 0], tiling=tiling))
    tiled.initialize(labels[0], image_embeddings=tiled_embeddings_with_ids((64, 64), *tiling))
    seg_tiled = tiled.generate(foreground_smoothing=0)
    predictor, segmenter, _ = _ais(labels[0], maps, img_size=1024, by_slice="calls")
    seg3d = automatic_instance_segmentation(predictor, segmenter, labels.astype("float32"), ndim=3, verbose=False,
                                            output_path=tmp_path / "3d.tif", foreground_smoothing=0)
    merged = merge_instance_segmentation_3d(labels.astype("uint64"), verbose=False)
    tracks = _recolor(labels, {(0, 1): 1, (1, 1): 1, (0, 2): 2, (1, 2): 2})
    for result in (seg2d, seg_tiled, seg3d, merged, tracks, tifffile.imread(tmp_path / "2d.tif"),
                   tifffile.imread(tmp_path / "3d.tif")):
        assert result.dtype == np.uint32
    assert seg2d.max() == seg_tiled.max() == seg3d.max() == merged.max() == tracks.max() == 2
