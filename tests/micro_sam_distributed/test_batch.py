"""Many images on a local dask cluster (2 worker processes, 127.0.0.1): one label image per input."""
import os

import numpy as np
import pytest
import tifffile

from micro_sam import util
from micro_sam.distributed import segment_images
from micro_sam.distributed._run import make_spec
from micro_sam.distributed._worker import model_load_count

from ._oracle import blob_image, decoder_calls, make_oracle, random_blobs
from .test_stitching import same_partition


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    truths = {}
    for i, shape in enumerate([(200, 300), (256, 256), (150, 400), (300, 220), (180, 180), (240, 320)]):
        image, labels = blob_image(shape, random_blobs(shape, 12, seed=20 + i), seed=i)
        tifffile.imwrite(folder / f"image_{i}.tif", image)
        truths[f"image_{i}"] = (image, labels)
    (folder / "notes.txt").write_text("not an image")
    return folder, truths


def test_batch_equals_single_process(image_folder, dask_client, tmp_path):
    from micro_sam.automatic_segmentation import automatic_instance_segmentation

    folder, truths = image_folder
    outputs = segment_images(folder, tmp_path / "labels", scheduler=dask_client, segmenter_factory=make_oracle,
                             verbose=False)
    assert [os.path.basename(o) for o in outputs] == [f"image_{i}.tif" for i in range(6)]
    predictor, segmenter = make_oracle()
    for output in outputs:
        image, truth = truths[os.path.basename(output)[:-4]]
        labels = tifffile.imread(output)
        expected = automatic_instance_segmentation(predictor, segmenter, image, verbose=False)
        np.testing.assert_array_equal(labels, expected)
        assert labels.dtype == np.uint32 and same_partition(np.where(truth > 0, labels, 0),
                                                            np.where(labels > 0, truth, 0))
    # Each worker loaded the model at most once, and both together once or twice (not once per image).
    spec = make_spec(util._DEFAULT_MODEL, None, None, None, None, None, None, make_oracle)
    loads = dask_client.run(model_load_count, spec)
    assert set(loads.values()) <= {0, 1} and sum(loads.values()) >= 1
    assert not [n for n in os.listdir(tmp_path / "labels") if n.endswith(".partial") or n.startswith(".image")]


def test_batch_rerun_skips_finished_outputs(image_folder, dask_client, tmp_path):
    folder, _ = image_folder
    out = tmp_path / "labels"
    outputs = segment_images(str(folder / "image_*.tif"), out, scheduler=dask_client, segmenter_factory=make_oracle,
                             verbose=False)
    first = {o: tifffile.imread(o) for o in outputs}
    stamps = {o: os.stat(o).st_mtime_ns for o in outputs}
    os.remove(outputs[2])
    os.remove(outputs[4])
    before = sum(dask_client.run(decoder_calls).values())
    segment_images(str(folder / "image_*.tif"), out, scheduler=dask_client, segmenter_factory=make_oracle,
                   verbose=False)
    assert sum(dask_client.run(decoder_calls).values()) - before == 2        # only the missing two
    for i, o in enumerate(outputs):
        np.testing.assert_array_equal(tifffile.imread(o), first[o])
        assert (os.stat(o).st_mtime_ns == stamps[o]) == (i not in (2, 4))
    # Other settings in the same folder: refused, unless overwrite.
    with pytest.raises(ValueError, match="other settings .*generate_kwargs"):
        segment_images(str(folder / "image_*.tif"), out, scheduler=dask_client, segmenter_factory=make_oracle,
                       verbose=False, min_size=50)


@pytest.mark.slow
def test_batch_real_model_on_workers_equals_single_process(dask_client, tmp_path):
    """The bundled model, loaded by name on the workers, gives the single-process result."""
    import torch

    from micro_sam.automatic_segmentation import automatic_instance_segmentation, get_predictor_and_segmenter
    from micro_sam.sample_data import synthetic_nuclei_2d

    images = [synthetic_nuclei_2d(shape=(96, 128), seed=s)[0] for s in (1, 2)]
    for i, image in enumerate(images):
        tifffile.imwrite(tmp_path / f"n{i}.tif", image)
    outputs = segment_images([tmp_path / "n0.tif", tmp_path / "n1.tif"], tmp_path / "labels", model_type="vit_t_demo",
                             scheduler=dask_client, verbose=False, device="cpu")
    predictor, segmenter = get_predictor_and_segmenter("vit_t_demo", device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the workers
    try:
        for image, output in zip(images, outputs):
            expected = automatic_instance_segmentation(predictor, segmenter, image, verbose=False)
            assert expected.max() > 3
            np.testing.assert_array_equal(tifffile.imread(output), expected)
    finally:
        torch.set_num_threads(threads)


def test_batch_bad_input(image_folder, tmp_path):
    folder, _ = image_folder
    kwargs = dict(scheduler="tcp://127.0.0.1:1", segmenter_factory=make_oracle, verbose=False)
    with pytest.raises(ValueError, match="does not exist"):
        segment_images(tmp_path / "missing.tif", tmp_path / "out", **kwargs)
    with pytest.raises(ValueError, match="No input images match"):
        segment_images(str(folder / "*.png"), tmp_path / "out", **kwargs)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    tifffile.imwrite(tmp_path / "a" / "x.tif", np.zeros((8, 8), "uint8"))
    tifffile.imwrite(tmp_path / "b" / "x.tif", np.zeros((8, 8), "uint8"))
    with pytest.raises(ValueError, match="same name"):
        segment_images([tmp_path / "a", tmp_path / "b"], tmp_path / "out", **kwargs)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        segment_images(folder, tmp_path / "file", **kwargs)
    with pytest.raises(ValueError, match="did not write"):
        segment_images(folder, tmp_path / "a", **kwargs)
    with pytest.raises(ValueError, match="tile_shape and halo"):
        segment_images(folder, tmp_path / "out", tile_shape=(64, 64), **kwargs)
    with pytest.raises(ValueError, match="Unknown model"):
        segment_images(folder, tmp_path / "out", model_type="vit_q", scheduler="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="Invalid scheduler address"):
        segment_images(folder, tmp_path / "out", scheduler="tcp://host with space:1", segmenter_factory=make_oracle)
    with pytest.raises(ValueError, match="does not answer"):
        segment_images(folder, tmp_path / "out", **kwargs)


def test_batch_on_its_own_local_cluster(image_folder, tmp_path, capsys):
    """Without a scheduler a LocalCluster on 127.0.0.1 is started (and closed), with the dashboard link."""
    folder, truths = image_folder
    outputs = segment_images(folder / "image_0.tif", tmp_path / "labels", n_workers=1, segmenter_factory=make_oracle)
    out = capsys.readouterr()
    assert "dask dashboard: http://127.0.0.1:" in out.out and "Segment images" in out.err
    image, truth = truths["image_0"]
    labels = tifffile.imread(outputs[0])
    assert labels.max() == truth.max()
    with pytest.raises(ValueError, match="n_workers"):
        segment_images(folder / "image_1.tif", tmp_path / "labels", n_workers=0, segmenter_factory=make_oracle)
