import os

import numpy as np
import pytest
import torch

from micro_sam.training import default_sam_dataset, default_sam_loader
from micro_sam.training.data import check_instance_labels, check_raw_range
from micro_sam.training.util import get_raw_transform, identity, require_8bit

from ._helpers import disk_images


def test_check_instance_labels_accepts_instances():
    _, labels = disk_images(1, n_objects=5)
    check_instance_labels(labels[0])
    check_instance_labels(labels[0].astype("float32"))
    check_instance_labels(np.zeros((8, 8), "uint8"))


def test_check_instance_labels_rejects_binary_masks():
    _, labels = disk_images(1, n_objects=5)
    with pytest.raises(ValueError, match="binary or semantic mask.*skimage.measure.label"):
        check_instance_labels(labels[0] > 0)
    with pytest.raises(ValueError, match="binary or semantic mask"):
        check_instance_labels((labels[0] > 0).astype("uint8") * 255)


def test_check_instance_labels_rejects_float_and_negative_values():
    _, labels = disk_images(1, n_objects=3)
    with pytest.raises(ValueError, match="non-integer values"):
        check_instance_labels(labels[0] * 0.5)
    with pytest.raises(ValueError, match="negative"):
        check_instance_labels(labels[0].astype("int32") - 1)
    with pytest.raises(ValueError, match="NaN"):
        check_instance_labels(np.full((4, 4), np.nan))


def test_check_raw_range():
    check_raw_range(np.array([0, 255], "uint8"), None)
    check_raw_range(np.array([0.0, 0.5]), None)  # require_8bit scales [0, 1] data
    with pytest.raises(ValueError, match=r"\[0, 4000\].*normalize_percentile"):
        check_raw_range(np.array([0, 4000], "uint16"), None)
    check_raw_range(np.array([0, 4000], "uint16"), get_raw_transform("normalize_percentile"))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        check_raw_range(np.array([-1.0, 1.0]), identity)


def test_raw_transforms():
    data = np.array([0.0, 0.25, 1.0])
    assert np.allclose(require_8bit(data * 0.5), [0, 31.875, 127.5])
    assert np.allclose(require_8bit(data * 100), data * 100)
    assert np.allclose(get_raw_transform("normalize_minmax")(np.array([10.0, 20.0, 30.0])), [0, 127.5, 255],
                       atol=1e-3)
    with pytest.raises(ValueError, match="'zscore' is not a supported preprocessing"):
        get_raw_transform("zscore")


def _array_dataset(with_decoder, **kwargs):
    images, labels = disk_images(2, shape=(96, 96), n_objects=4)
    return default_sam_dataset(images, None, labels, None, patch_shape=(64, 64),
                               with_segmentation_decoder=with_decoder, n_samples=3, **kwargs), labels


def test_dataset_targets_without_decoder():
    dataset, _ = _array_dataset(False)
    assert len(dataset) == 3
    x, y = dataset[0]
    assert x.shape == (1, 64, 64) and y.shape == (1, 64, 64)
    assert 0 <= float(x.min()) and float(x.max()) <= 255 and float(x.max()) > 100
    ids = torch.unique(y)
    assert len(ids) >= 2 and torch.equal(ids, ids.round())


def test_dataset_targets_with_decoder():
    dataset, _ = _array_dataset(True)
    x, y = dataset[0]
    assert y.shape == (4, 64, 64)
    instances, foreground = y[0], y[1]
    # The foreground channel is the support of the instance channel; distances are in [0, 1].
    assert torch.equal(foreground > 0, instances > 0)
    assert float(y[1:].min()) >= 0 and float(y[1:].max()) <= 1
    only, _ = _array_dataset(True, train_instance_segmentation_only=True)
    assert only[0][1].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="needs with_segmentation_decoder=True"):
        _array_dataset(False, train_instance_segmentation_only=True)


def test_default_n_samples():
    images, labels = disk_images(2, shape=(96, 96), n_objects=4)
    train = default_sam_dataset(images, None, labels, None, (64, 64), False)
    val = default_sam_dataset(images, None, labels, None, (64, 64), False, is_train=False)
    assert len(train) == 100 and len(val) == 5


def test_dataset_rejects_bad_labels_and_images():
    images, labels = disk_images(2, shape=(96, 96), n_objects=4)
    binary = [(lab > 0).astype("uint8") for lab in labels]
    with pytest.raises(ValueError, match="binary or semantic mask"):
        default_sam_dataset(images, None, binary, None, (64, 64), True, n_samples=2)
    fractional = [lab.astype("float32") / 2 for lab in labels]
    with pytest.raises(ValueError, match="non-integer"):
        default_sam_dataset(images, None, fractional, None, (64, 64), True, n_samples=2)
    bright = [img.astype("uint16") * 20 for img in images]
    with pytest.raises(ValueError, match="outside SAM's input range.*normalize_percentile"):
        default_sam_dataset(bright, None, labels, None, (64, 64), True, n_samples=2)
    dataset = default_sam_dataset(bright, None, labels, None, (64, 64), True, n_samples=2,
                                  raw_transform=get_raw_transform("normalize_percentile"))
    x, _ = dataset[0]
    assert 0 <= float(x.min()) and float(x.max()) <= 255


def test_file_formats(tmp_path):
    import h5py
    import imageio.v3 as imageio
    import zarr

    images, labels = disk_images(2, shape=(96, 96), n_objects=4)
    tif_images, tif_labels = [], []
    for i, (image, label) in enumerate(zip(images, labels)):
        tif_images.append(str(tmp_path / f"image{i}.tif"))
        tif_labels.append(str(tmp_path / f"labels{i}.tif"))
        imageio.imwrite(tif_images[-1], image)
        imageio.imwrite(tif_labels[-1], label)
    h5_path = str(tmp_path / "data.h5")
    with h5py.File(h5_path, "w") as f:
        f.create_dataset("raw", data=np.stack(images))
        f.create_dataset("labels", data=np.stack(labels))
    zarr_path = str(tmp_path / "data.zarr")
    group = zarr.open_group(zarr_path, mode="w")
    group.create_array("raw", data=np.stack(images))
    group.create_array("labels", data=np.stack(labels))

    specs = [
        (tif_images, None, tif_labels, None),                         # list of image files
        (str(tmp_path), "image*.tif", str(tmp_path), "labels*.tif"),  # folder with glob pattern
        (h5_path, "raw", h5_path, "labels"),                          # volume in hdf5: 2D patches
        (zarr_path, "raw", zarr_path, "labels"),                      # volume in zarr
    ]
    for raw, raw_key, lab, lab_key in specs:
        dataset = default_sam_dataset(raw, raw_key, lab, lab_key, patch_shape=(64, 64),
                                      with_segmentation_decoder=True, n_samples=2)
        x, y = dataset[0]
        assert x.shape[-2:] == (64, 64) and y.shape[-3:] == (4, 64, 64), (raw, x.shape, y.shape)
    assert os.path.exists(h5_path)


def test_loader_remembers_whether_batch_size_was_given():
    images, labels = disk_images(2, shape=(96, 96), n_objects=4)
    kwargs = dict(raw_paths=images, raw_key=None, label_paths=labels, label_key=None, patch_shape=(64, 64),
                  with_segmentation_decoder=False, n_samples=4)
    default = default_sam_loader(**kwargs)
    assert default.batch_size == 1 and default.micro_sam_batch_size_given is False
    given = default_sam_loader(batch_size=2, shuffle=True, **kwargs)
    assert given.batch_size == 2 and given.micro_sam_batch_size_given is True
    x, y = next(iter(given))
    assert x.shape == (2, 1, 64, 64) and y.shape == (2, 1, 64, 64)
