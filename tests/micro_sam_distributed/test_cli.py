"""The command line micro_sam.distributed_segmentation (called through main(argv), as the console script)."""
import numpy as np
import pytest
import tifffile
import zarr

from micro_sam.distributed.cli import main

from .test_stitching import same_partition


def test_cli_images_and_blockwise(dask_client, tmp_path, capsys):
    """Both commands on the cluster with the oracle model of _oracle.py (a factory the workers import)."""
    from ._oracle import blob_image, random_blobs

    images = [blob_image((120, 150), random_blobs((120, 150), 6, seed=s), seed=s) for s in (30, 31)]
    for i, (image, _) in enumerate(images):
        tifffile.imwrite(tmp_path / f"im{i}.tif", image)
    common = ["--scheduler", dask_client.scheduler.address, "--segmenter_factory",
              "micro_sam_distributed._oracle:make_oracle"]
    assert main(["images", "-i", str(tmp_path / "im*.tif"), "-o", str(tmp_path / "labels")] + common) == 0
    out = capsys.readouterr().out
    assert "2 label image(s)" in out and f"dask dashboard: {dask_client.dashboard_link}" in out
    for i, (_, truth) in enumerate(images):
        labels = tifffile.imread(tmp_path / "labels" / f"im{i}.tif")
        assert labels.max() == truth.max() and same_partition(np.where(truth > 0, labels, 0),
                                                              np.where(labels > 0, truth, 0))

    image, truth = blob_image((200, 260), random_blobs((200, 260), 14, seed=5), seed=5)
    tifffile.imwrite(tmp_path / "large.tif", image, tile=(32, 32))
    argv = ["blockwise", "-i", str(tmp_path / "large.tif"), "-o", str(tmp_path / "large.zarr"), "--block_shape",
            "96", "128", "--block_halo", "24", "24"] + common
    assert main(argv + ["--min_size", "10"]) == 0
    assert "objects written to" in capsys.readouterr().out
    labels = zarr.open_array(str(tmp_path / "large.zarr" / "segmentation"), mode="r")[...]
    assert labels.max() == truth.max() and same_partition(np.where(truth > 0, labels, 0),
                                                          np.where(labels > 0, truth, 0))
    # Rerun: complete already, nothing printed with -q; other settings: exit code 2, one line.
    assert main(argv + ["--min_size", "10", "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert main(argv + ["--min_size", "20", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings" in err and "generate_kwargs" in err


@pytest.mark.slow
def test_cli_blockwise_with_the_bundled_model(dask_client, tmp_path, capsys):
    """The bundled model loaded by name on the workers, a tif input read lazily in 4 blocks."""
    from micro_sam.evaluation.metrics import mean_segmentation_accuracy
    from micro_sam.sample_data import synthetic_nuclei_2d

    # Blocks near the model's training scale (outer regions of ~450 pixels, the encoder runs at 640): much smaller
    # blocks are magnified several times and the demo model, trained at one scale, fails on them.
    image, truth = synthetic_nuclei_2d(shape=(640, 768), seed=4)
    tifffile.imwrite(tmp_path / "image.tif", image, tile=(64, 64))
    output = tmp_path / "labels.zarr"
    argv = ["blockwise", "-i", str(tmp_path / "image.tif"), "-o", str(output), "-m", "vit_t_demo",
            "--block_shape", "320", "384", "--block_halo", "48", "48", "--scheduler", dask_client.scheduler.address,
            "-d", "cpu"]
    assert main(argv) == 0
    labels = zarr.open_array(str(output / "segmentation"), mode="r")[...]
    assert labels.shape == image.shape and mean_segmentation_accuracy(labels, truth) > 0.5


@pytest.mark.parametrize("argv, message", [
    (["blockwise", "-i", "{tmp}/missing.zarr", "-o", "{tmp}/o.zarr"], "does not exist"),
    (["blockwise", "-i", "{tmp}/in.zarr", "-o", "{tmp}/o.zarr", "--block_shape", "8", "8"], "smaller than"),
    (["blockwise", "-i", "{tmp}/in.zarr", "-o", "{tmp}/o.zarr", "--scheduler", "tcp://127.0.0.1:1"],
     "does not answer"),
    (["images", "-i", "{tmp}/in.zarr", "-o", "{tmp}/out", "--no_such_parameter", "1"], "Unknown segmentation"),
    (["images", "-i", "{tmp}/in.zarr", "-o", "{tmp}/out", "--tile_shape", "64", "64"], "together"),
    (["frobnicate"], "invalid choice"),
    (["images", "-i", "{tmp}/in.zarr", "-o", "{tmp}/out", "--segmenter_factory", "nowhere:nothing"],
     "Cannot import"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=(64, 64), dtype="uint8")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("micro_sam.distributed_segmentation: error:") and message in err and err.count("\n") == 1
